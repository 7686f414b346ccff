#include "npy.hpp"

#include <cctype>
#include <cstdio>
#include <fstream>
#include <limits>
#include <stdexcept>

// NPY data is little-endian ('<f4'); the bytes are copied as they are, so the host must be too.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "qatflow_runner assumes a little-endian host");

namespace {

const char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

// The header is a Python dict literal, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }.
// This parses exactly that grammar (string keys; string, True/False or int-tuple values) and
// rejects anything else, rather than searching for substrings that could match in the wrong place.
class HeaderParser {
 public:
  explicit HeaderParser(const std::string& text) : s_(text) {}

  void parse(std::string& descr, bool& fortran_order, std::vector<int64_t>& shape) {
    bool seen_descr = false, seen_order = false, seen_shape = false;
    expect('{');
    while (!peek('}')) {
      const std::string key = quoted();
      expect(':');
      if (key == "descr") {
        descr = quoted();
        seen_descr = true;
      } else if (key == "fortran_order") {
        fortran_order = boolean();
        seen_order = true;
      } else if (key == "shape") {
        shape = int_tuple();
        seen_shape = true;
      } else {
        fail("unexpected key '" + key + "'");
      }
      if (!peek('}')) expect(',');
    }
    expect('}');
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters after the header dict");
    if (!seen_descr || !seen_order || !seen_shape)
      fail("header lacks one of 'descr', 'fortran_order', 'shape'");
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("malformed NPY header (" + why + "): " + s_);
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool peek(char c) {
    skip_ws();
    return i_ < s_.size() && s_[i_] == c;
  }
  void expect(char c) {
    if (!peek(c)) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string quoted() {
    skip_ws();
    if (i_ >= s_.size() || (s_[i_] != '\'' && s_[i_] != '"')) fail("expected a quoted string");
    const char q = s_[i_++];
    const size_t end = s_.find(q, i_);
    if (end == std::string::npos) fail("unterminated string");
    std::string value = s_.substr(i_, end - i_);
    i_ = end + 1;
    return value;
  }
  bool boolean() {
    skip_ws();
    for (const auto& [word, value] : {std::pair{"True", true}, std::pair{"False", false}}) {
      const std::string w = word;
      if (s_.compare(i_, w.size(), w) == 0) {
        i_ += w.size();
        return value;
      }
    }
    fail("expected True or False");
  }
  std::vector<int64_t> int_tuple() {
    std::vector<int64_t> dims;
    expect('(');
    while (!peek(')')) {
      if (i_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[i_]))) fail("expected a dimension");
      int64_t dim = 0;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) {
        if (dim > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("dimension too large");
        dim = dim * 10 + (s_[i_++] - '0');
      }
      dims.push_back(dim);
      if (!peek(')')) expect(',');
    }
    expect(')');
    return dims;
  }
};

// Little-endian unsigned integer of `n` bytes from the stream; false on a short read.
bool read_le(std::istream& in, size_t n, uint64_t& value) {
  unsigned char bytes[4];
  if (!in.read(reinterpret_cast<char*>(bytes), static_cast<std::streamsize>(n))) return false;
  value = 0;
  for (size_t k = n; k-- > 0;) value = (value << 8) | bytes[k];
  return true;
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

NpyArray read_npy_f32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open (missing or unreadable)");
  try {
    char magic[kMagicLen];
    if (!in.read(magic, kMagicLen) || std::string(magic, kMagicLen) != std::string(kMagic, kMagicLen))
      throw std::runtime_error("not an NPY file (bad magic string)");
    uint64_t major = 0, minor = 0, header_len = 0;
    if (!read_le(in, 1, major) || !read_le(in, 1, minor)) throw std::runtime_error("truncated NPY preamble");
    // 1.0 stores the header length in 2 bytes, 2.0 in 4; 3.0 (UTF-8 headers) never holds a float array.
    if ((major != 1 && major != 2) || minor != 0)
      throw std::runtime_error("unsupported NPY version " + std::to_string(major) + "." + std::to_string(minor) +
                               " (expected 1.0 or 2.0)");
    if (!read_le(in, major == 1 ? 2 : 4, header_len)) throw std::runtime_error("truncated NPY preamble");
    std::string header(header_len, '\0');
    if (!in.read(header.data(), static_cast<std::streamsize>(header_len)))
      throw std::runtime_error("truncated NPY header");

    NpyArray array;
    std::string descr;
    bool fortran_order = true;
    HeaderParser(header).parse(descr, fortran_order, array.shape);
    if (descr != "<f4")
      throw std::runtime_error("dtype is '" + descr + "', expected '<f4' (little-endian float32)");
    if (fortran_order) throw std::runtime_error("array is in Fortran order, expected C order");

    uint64_t count = 1;
    for (int64_t dim : array.shape) {
      if (dim != 0 && count > std::numeric_limits<uint64_t>::max() / 4 / static_cast<uint64_t>(dim))
        throw std::runtime_error("shape " + shape_str(array.shape) + " is too large");
      count *= static_cast<uint64_t>(dim);
    }
    array.data.resize(count);
    const auto bytes = static_cast<std::streamsize>(count * sizeof(float));
    if (!in.read(reinterpret_cast<char*>(array.data.data()), bytes))
      throw std::runtime_error("data is shorter than shape " + shape_str(array.shape) + " needs");
    if (in.peek() != std::char_traits<char>::eof())
      throw std::runtime_error("data is longer than shape " + shape_str(array.shape) + " needs");
    return array;
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

void write_npy_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_str(shape) + ", }";
  // NumPy pads with spaces and a final newline so the data starts on a 64-byte boundary.
  const size_t preamble = kMagicLen + 2 + 2;
  header.append(63 - (preamble + header.size()) % 64, ' ');
  header += '\n';
  if (header.size() > 0xFFFF) throw std::runtime_error(path + ": shape too long for an NPY 1.0 header");

  uint64_t count = 1;
  for (int64_t dim : shape) count *= static_cast<uint64_t>(dim);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    const char version_and_len[4] = {1, 0, static_cast<char>(header.size() & 0xFF),
                                     static_cast<char>(header.size() >> 8)};
    out.write(kMagic, kMagicLen);
    out.write(version_and_len, 4);
    out << header;
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw std::runtime_error(path + ": cannot write");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename " + tmp + " into place");
  }
}
