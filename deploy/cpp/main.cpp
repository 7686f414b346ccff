// qatflow_runner: runs an exported qatflow TorchScript model (models/fp32.pt, models/int8.pt) from
// C++, with no Python, and measures its latency.
//
//   qatflow_runner MODEL.pt INPUTS.npy [--out LOGITS.npy] [--threads N] [--repeats N] [--batch-sizes 1,64]
//                  [--serve]
//
// On a shared host OpenMP threads that spin at a barrier while a peer is descheduled multiply tail
// latency (batch 1, two busy loops beside it: p99 220 ms spinning, 9.8 ms passive; see
// tasks/serving.py). libgomp reads OMP_WAIT_POLICY once, when it is loaded, so the runner
// re-executes itself with OMP_WAIT_POLICY=PASSIVE when the variable is unset (set it, even empty,
// to keep your own). --serve runs a batch of one on one thread and larger batches on --threads.
//
// INPUTS.npy holds already-normalized float32 inputs (N, C, H, W). The last line on stdout is one
// JSON object (samples, classes, threads, latency per batch size) for callers to json.loads().
// Exit status: 0 on success, 1 on any error (message on stderr), 2 on a bad command line.

#include <ATen/Parallel.h>
#include <torch/script.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.hpp"

namespace {

constexpr int64_t kInferenceBatch = 256;  // the same chunking as tasks/runtimes/isolated.py
constexpr int kWarmupCalls = 5;           // as tasks/evaluate.py: the profiling executor specializes
                                          // the graph over the first calls

const char kUsage[] =
    "usage: qatflow_runner MODEL.pt INPUTS.npy [--out LOGITS.npy] [--threads N] [--repeats N]"
    " [--batch-sizes 1,64] [--serve]\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// libtorch 2.13 deprecates quantized tensor creation and warns on the first int8 call. The same
// exact warning tasks/deprecations.py silences in Python is dropped here; any other warning still
// reaches stderr through the default handler.
class DeprecationFilter : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized") !=
        std::string::npos)
      return;
    c10::WarningHandler::process(warning);
  }
};

// The message of a libtorch error without its C++ backtrace, which a user cannot act on.
std::string message_of(const std::exception& e) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&e)) return torch_error->what_without_backtrace();
  return e.what();
}

struct Options {
  std::string model, inputs, out;
  int threads = 2;
  int repeats = 50;
  bool serve = false;  // threads per batch size, as tasks/serving.py's serving_threads
  std::vector<int64_t> batch_sizes{1, 64};
};

// tasks/serving.py: SINGLE_THREAD_MAX_BATCH.
int serving_threads(int64_t batch_size, int available) { return batch_size <= 1 ? 1 : available; }

int64_t positive_int(const std::string& text, const std::string& flag) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || value < 1 || value > 1'000'000)
    throw UsageError(flag + " expects a positive integer, got '" + text + "'");
  return value;
}

Options parse_args(int argc, char** argv) {
  Options opt;
  std::vector<std::string> positional;
  for (int k = 1; k < argc; ++k) {
    const std::string arg = argv[k];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      positional.push_back(arg);
      continue;
    }
    if (arg == "--serve") {
      opt.serve = true;
      continue;
    }
    if (k + 1 >= argc) throw UsageError(arg + " needs a value");
    const std::string value = argv[++k];
    if (arg == "--out") {
      opt.out = value;
    } else if (arg == "--threads") {
      opt.threads = static_cast<int>(positive_int(value, arg));
    } else if (arg == "--repeats") {
      opt.repeats = static_cast<int>(positive_int(value, arg));
    } else if (arg == "--batch-sizes") {
      opt.batch_sizes.clear();
      std::stringstream list(value);
      for (std::string item; std::getline(list, item, ',');) opt.batch_sizes.push_back(positive_int(item, arg));
      if (opt.batch_sizes.empty()) throw UsageError("--batch-sizes needs at least one size");
    } else {
      throw UsageError("unknown option " + arg);
    }
  }
  if (positional.size() != 2) throw UsageError("expected MODEL.pt and INPUTS.npy");
  opt.model = positional[0];
  opt.inputs = positional[1];
  return opt;
}

// A top-level string value of export's meta.json ("backend": "x86", "variant": "int8"), or "" when
// it is null or absent. A string search is enough for the flat keys export writes (they precede the
// nested "model" config); no JSON library needed.
std::string meta_string(const std::string& meta, const std::string& key) {
  const std::string quoted_key = "\"" + key + "\"";
  size_t i = meta.find(quoted_key);
  if (i == std::string::npos) return "";
  i = meta.find_first_not_of(" \t\r\n", i + quoted_key.size());
  if (i == std::string::npos || meta[i] != ':') return "";
  i = meta.find_first_not_of(" \t\r\n", i + 1);
  if (i == std::string::npos || meta[i] != '"') return "";  // null
  const size_t end = meta.find('"', i + 1);
  return end == std::string::npos ? "" : meta.substr(i + 1, end - i - 1);
}

at::QEngine qengine_named(const std::string& name) {
  at::QEngine engine;
  if (name == "x86") engine = at::QEngine::X86;
  else if (name == "qnnpack") engine = at::QEngine::QNNPACK;
  else if (name == "fbgemm") engine = at::QEngine::FBGEMM;
  else if (name == "onednn") engine = at::QEngine::ONEDNN;
  else throw std::runtime_error("meta.json names an unknown quantized backend '" + name + "'");
  const auto& supported = at::globalContext().supportedQEngines();
  if (std::find(supported.begin(), supported.end(), engine) == supported.end())
    throw std::runtime_error("this libtorch has no '" + name + "' quantized engine");
  return engine;
}

// Loads MODEL and selects the quantized engine its meta.json names. Quantized weights are
// prepacked for the engine that is current *while loading* (a qnnpack model loaded under x86 runs
// x86 kernels), so when the engine has to change, the model is loaded again under the right one.
torch::jit::Module load_model(const std::string& path, std::string& backend, std::string& variant) {
  if (!std::filesystem::is_regular_file(path)) throw std::runtime_error(path + ": no such file");
  try {
    torch::jit::ExtraFilesMap extra{{"meta.json", ""}};
    torch::jit::Module module = torch::jit::load(path, torch::kCPU, extra);
    backend = meta_string(extra["meta.json"], "backend");
    variant = meta_string(extra["meta.json"], "variant");
    if (!backend.empty()) {
      const at::QEngine engine = qengine_named(backend);
      if (at::globalContext().qEngine() != engine) {
        at::globalContext().setQEngine(engine);
        module = torch::jit::load(path, torch::kCPU);
      }
    }
    module.eval();
    return module;
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": cannot load as a TorchScript model: " + message_of(e));
  }
}

torch::Tensor forward(torch::jit::Module& module, const torch::Tensor& batch) {
  torch::jit::IValue out = module.forward({batch});
  if (!out.isTensor()) throw std::runtime_error("the model returned " + out.tagKind() + ", not a tensor");
  return out.toTensor();
}

// Logits for every sample, in batches of kInferenceBatch; checks they are (N, num_classes).
torch::Tensor predict(torch::jit::Module& module, const torch::Tensor& x) {
  std::vector<torch::Tensor> parts;
  for (int64_t start = 0; start < x.size(0); start += kInferenceBatch)
    parts.push_back(forward(module, x.narrow(0, start, std::min(kInferenceBatch, x.size(0) - start))));
  torch::Tensor logits = torch::cat(parts).contiguous();
  if (logits.dim() != 2 || logits.size(0) != x.size(0) || logits.scalar_type() != torch::kFloat32)
    throw std::runtime_error("expected float32 logits of shape (" + std::to_string(x.size(0)) +
                             ", classes), got " + shape_str(logits.sizes().vec()));
  return logits;
}

// Linear interpolation between closest ranks, as numpy.percentile (what tasks/evaluate.py uses).
double percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double pos = q / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (pos - static_cast<double>(lo)) * (values[hi] - values[lo]);
}

struct Latency {
  int64_t batch_size;
  double median_ms, p90_ms;
};

// Wall time of single forward calls on the first `batch_size` samples (the inputs repeated when
// there are fewer), after a few warm-up calls, the way tasks/evaluate.py times the Python side.
// Pass a freshly loaded module: TorchScript's profiling executor specializes the graph for the
// shapes of its first calls, and a module that has already run other batch sizes runs this one
// on its slower fallback path (measured: int8 batch 1 takes ~0.17 ms instead of ~0.09 ms).
Latency time_model(torch::jit::Module module, const torch::Tensor& x, int64_t batch_size, int repeats) {
  const torch::Tensor batch = x.index_select(0, torch::arange(batch_size, torch::kLong).remainder(x.size(0)));
  for (int k = 0; k < kWarmupCalls; ++k) forward(module, batch);
  std::vector<double> ms(repeats);
  for (int k = 0; k < repeats; ++k) {
    const auto start = std::chrono::steady_clock::now();
    forward(module, batch);
    ms[k] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
  return {batch_size, percentile(ms, 50), percentile(ms, 90)};
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string fixed(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.4f", value);
  return text;
}

std::string summary_json(const Options& opt, const std::string& backend, int64_t samples, int64_t classes,
                         const std::vector<Latency>& latencies) {
  std::string json = "{\"model\": " + json_string(opt.model) +
                     ", \"backend\": " + (backend.empty() ? "null" : json_string(backend)) +
                     ", \"samples\": " + std::to_string(samples) + ", \"num_classes\": " + std::to_string(classes) +
                     ", \"threads\": " + std::to_string(opt.threads) + ", \"repeats\": " + std::to_string(opt.repeats) +
                     ", \"latency_ms\": {";
  for (size_t k = 0; k < latencies.size(); ++k)
    json += (k ? ", " : "") + json_string("batch_" + std::to_string(latencies[k].batch_size)) +
            ": {\"median\": " + fixed(latencies[k].median_ms) + ", \"p90\": " + fixed(latencies[k].p90_ms) + "}";
  return json + "}}";
}

void print_predictions(const torch::Tensor& logits) {
  const torch::Tensor counts = logits.argmax(1).bincount({}, logits.size(1));
  std::cout << "predictions per class:";
  for (int64_t c = 0; c < logits.size(1); ++c) std::cout << ' ' << c << ':' << counts[c].item<int64_t>();
  std::cout << '\n';
}

int run(const Options& opt) {
  // Interop threads must be fixed before any parallel work starts; intra-op threads are the knob.
  at::set_num_interop_threads(1);
  at::set_num_threads(opt.threads);

  NpyArray inputs = read_npy_f32(opt.inputs);
  if (inputs.shape.size() < 2 || inputs.shape[0] == 0)
    throw std::runtime_error(opt.inputs + ": expected at least one sample of shape (N, ...), got shape " +
                             shape_str(inputs.shape));
  std::string backend, variant;
  torch::jit::Module module = load_model(opt.model, backend, variant);

  c10::InferenceMode guard;
  const torch::Tensor x = torch::from_blob(inputs.data.data(), inputs.shape, torch::kFloat32);  // views `inputs`
  const auto start = std::chrono::steady_clock::now();
  torch::Tensor logits;
  try {
    logits = predict(module, x);
  } catch (const std::exception& e) {
    throw std::runtime_error(opt.model + " failed on " + opt.inputs + " " + shape_str(inputs.shape) + ": " +
                             message_of(e));
  }
  const double total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  const int64_t samples = logits.size(0), classes = logits.size(1);

  std::cout << opt.model << " (variant " << (variant.empty() ? "?" : variant) << ", quantized backend "
            << (backend.empty() ? "none" : backend) << "), " << opt.threads << " thread(s): " << samples
            << " samples in " << fixed(total_ms) << " ms\n";
  print_predictions(logits);
  if (!opt.out.empty()) {
    write_npy_f32(opt.out, logits.data_ptr<float>(), {samples, classes});
    std::cout << "logits " << shape_str({samples, classes}) << " written to " << opt.out << '\n';
  }

  std::vector<Latency> latencies;
  for (const int64_t bs : opt.batch_sizes) {
    if (opt.serve) at::set_num_threads(serving_threads(bs, opt.threads));
    latencies.push_back(time_model(load_model(opt.model, backend, variant), x, bs, opt.repeats));
    std::cout << "latency batch " << bs << ": median " << fixed(latencies.back().median_ms) << " ms, p90 "
              << fixed(latencies.back().p90_ms) << " ms (" << opt.repeats << " calls)\n";
  }
  std::cout << summary_json(opt, backend, samples, classes, latencies) << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && setenv("OMP_WAIT_POLICY", "PASSIVE", 1) == 0) {
    execv("/proc/self/exe", argv);  // returns only on failure: then run on, with libgomp's default
    unsetenv("OMP_WAIT_POLICY");
  }
  DeprecationFilter filter;
  c10::WarningUtils::WarningHandlerGuard filter_guard(&filter);
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "qatflow_runner: " << e.what() << '\n' << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "qatflow_runner: error: " << message_of(e) << '\n';
    return 1;
  }
}
