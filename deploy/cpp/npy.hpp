// A strict reader and a writer for float32 NPY files (https://numpy.org/neps/nep-0001-npy-format.html).
// Only what qatflow_runner needs: '<f4', C order, format versions 1.0 and 2.0. Anything else is an
// error naming the file, never a silent reinterpretation of the bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // C order, shape's product elements
};

// Throws std::runtime_error("PATH: reason") on a missing file or anything but a float32 C-order array.
NpyArray read_npy_f32(const std::string& path);

// Writes atomically: PATH.tmp first, then renamed over PATH, so a failed run never leaves a
// truncated file that looks valid. Throws std::runtime_error naming the file.
void write_npy_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape);

// "(500, 1, 28, 28)", as NumPy prints a shape; for error messages.
std::string shape_str(const std::vector<int64_t>& shape);
