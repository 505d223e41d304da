#include "train/estimate.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "aviary/error.h"
#include "models/stages.h"
#include "tensor/aligned.h"
#include "tensor/thread_pool.h"
#include "train/chunked.h"
#include "train/init.h"
#include "train/optimizer.h"
#include "train/rwkv7_graph.h"

namespace aviary::train {
namespace {

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string Join(const std::vector<std::string>& names) {
  std::string all;
  for (const std::string& n : names) all += (all.empty() ? "" : ", ") + n;
  return all;
}

std::string Number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// LoRA's targets, per layer: the time mix's receptance, key, value and output (C x C) and the
// channel mix's key (F x C) and value (C x F). A rank-R adapter of an out x in matrix is
// R (in + out) parameters.
double LoraPerRank(int n_layer, int C, int F) {
  return static_cast<double>(n_layer) * (4.0 * 2 * C + 2.0 * (C + F));
}

}  // namespace

const std::vector<ShapePreset>& ShapePresets() {
  static const std::vector<ShapePreset> kPresets = {
      {"rwkv7-0.1b", "BlinkDL's RWKV-7 World 0.1B, L12-D768", true, 12, 768, 65536},
      {"rwkv7-0.4b", "BlinkDL's RWKV-7 World 0.4B, L24-D1024", true, 24, 1024, 65536},
      {"rwkv7-1.5b", "BlinkDL's RWKV-7 World 1.5B, L24-D2048", true, 24, 2048, 65536},
      {"rwkv7-2.9b", "BlinkDL's RWKV-7 World 2.9B, L32-D2560", true, 32, 2560, 65536},
      {"rwkv7-7.2b", "BlinkDL's RWKV-7 G0 7.2B, L32-D4096", true, 32, 4096, 65536},
      {"rwkv4-1.5b", "BlinkDL's RWKV-4 Pile 1.5B, L24-D2048", false, 24, 2048, 50277},
      {"rwkv4-14b", "BlinkDL's RWKV-4 Pile 14B, L40-D5120", false, 40, 5120, 50277},
  };
  return kPresets;
}

ModelShape ShapeFromPreset(const std::string& name) {
  const std::string key = Lower(name);
  for (const ShapePreset& p : ShapePresets()) {
    if (p.name != key) continue;
    ModelShape s = p.rwkv7 ? ShapeRwkv7(p.n_layer, p.n_embd, p.vocab)
                           : ShapeRwkv4(p.n_layer, p.n_embd, p.vocab);
    s.source = "preset " + p.name + ": " + p.note;
    return s;
  }
  std::vector<std::string> names;
  for (const ShapePreset& p : ShapePresets()) names.push_back(p.name);
  throw UsageError("unknown model preset '" + name + "': known presets are " + Join(names));
}

namespace {

// The shape of an RWKV-7 of any sizes, counted from its ParamLayout.
ModelShape ShapeOfRwkv7(const Rwkv7Config& config) {
  try {
    config.Validate();
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
  const ParamLayout layout = ParamLayout::Rwkv7(config);
  ModelShape s;
  s.kind = ShapeKind::kRwkv7;
  s.rwkv7 = config;
  s.n_layer = config.n_layer;
  s.n_embd = config.n_embd;
  s.vocab = config.vocab;
  s.head_size = config.head_size;
  s.n_ffn = config.n_ffn;
  s.description = "RWKV-7, " + std::to_string(s.n_layer) + " layers x " + std::to_string(s.n_embd) +
                  ", vocabulary " + std::to_string(s.vocab) + ", head size " +
                  std::to_string(s.head_size);
  if (s.n_ffn != 4 * s.n_embd) s.description += ", channel mix " + std::to_string(s.n_ffn);
  s.source = "--layers/--embd/--vocab, RWKV-LM's sizes for the rest";
  for (const ParamEntry& e : layout.entries()) {
    const double n = static_cast<double>(e.size);
    s.params += n;
    if (e.name == "emb.weight") {
      s.embedding += n;
      continue;
    }
    // Matrices: the 2-D entries but r_k (H x N, used element-wise). Layer 0's v1 and v2 are in
    // every file but the forward pass never multiplies by them (layer 0 has no value residual).
    const bool layer0_v = e.name == "blocks.0.att.v1" || e.name == "blocks.0.att.v2";
    if (e.shape.size() == 2 && e.name.find(".r_k") == std::string::npos && !layer0_v) {
      s.matrix_params += n;
    }
  }
  s.lora_params_per_rank = LoraPerRank(s.n_layer, s.n_embd, s.n_ffn);
  s.state_floats = static_cast<double>(s.n_layer) * s.n_embd * s.head_size;
  return s;
}

}  // namespace

ModelShape ShapeRwkv7(int n_layer, int n_embd, int vocab) {
  return ShapeOfRwkv7(Rwkv7Config::Official(n_layer, n_embd, vocab));
}

ModelShape ShapeRwkv4(int n_layer, int n_embd, int vocab) {
  if (n_layer < 1 || n_layer > 1024) throw UsageError("--layers must be 1..1024");
  if (n_embd < 1 || n_embd > 65536) throw UsageError("--embd must be 1..65536");
  if (vocab < 2 || vocab > (1 << 24)) throw UsageError("--vocab must be 2..16777216");
  const double L = n_layer, C = n_embd, V = vocab;
  ModelShape s;
  s.kind = ShapeKind::kRwkv;
  s.n_layer = n_layer;
  s.n_embd = n_embd;
  s.vocab = vocab;
  s.head_size = n_embd;
  s.n_ffn = 4 * n_embd;
  s.description = "RWKV-4, " + std::to_string(n_layer) + " layers x " + std::to_string(n_embd) +
                  ", vocabulary " + std::to_string(vocab);
  s.source = "--layers/--embd/--vocab (RWKV-4)";
  s.embedding = V * C;
  s.matrix_params = L * 13 * C * C + V * C;  // 4 C^2 time mix, 9 C^2 channel mix; the head
  // Vectors per layer: two LayerNorms (4 C), time decay, first, three mixes (5 C), two channel
  // mixes (2 C); ln0 and ln_out (4 C).
  s.params = s.embedding + s.matrix_params + L * 11 * C + 4 * C;
  // The channel mix's receptance (C x C) is a LoRA target too.
  s.lora_params_per_rank = LoraPerRank(n_layer, n_embd, 4 * n_embd) + L * 2 * C;
  s.state_floats = 0;  // RWKV-4's state is 5 C per layer, not the H N N matrix state tuning trains
  return s;
}

ModelShape ShapeGeneric(double params) {
  if (!(params >= 1) || !std::isfinite(params) || params > 1e15) {
    throw UsageError("--params must be a parameter count from 1 to 1e15, not " + Number(params));
  }
  ModelShape s;
  s.kind = ShapeKind::kGeneric;
  s.params = params;
  s.matrix_params = params;
  s.description = "a model of " + Number(params) + " parameters, shape unknown";
  if (params >= 1e9)
    s.description = "a model of " + Number(params / 1e9) + " B parameters, shape unknown";
  s.source = "--params: all counted in 6 N D (no embedding split, no attention term)";
  return s;
}

ModelShape ShapeFromModelInfo(const ModelInfo& info) {
  if (info.n_layer < 1 || info.n_embd < 1 || info.n_vocab < 1) {
    throw Error(info.path + ": the model's header gives no usable shape");
  }
  ModelShape s;
  if (info.arch == Arch::kV7) {
    Rwkv7Config c = Rwkv7Config::Official(info.n_layer, info.n_embd, info.n_vocab);
    c.head_size = info.head_size;
    c.n_ffn = info.n_ffn;
    try {
      s = ShapeOfRwkv7(c);
    } catch (const Error& e) {
      throw Error(info.path + ": " + e.what());
    }
    s.source = info.path + " (" + info.format + "; low-rank widths by RWKV-LM's formula)";
  } else {
    s.kind = ShapeKind::kRwkv;
    s.n_layer = info.n_layer;
    s.n_embd = info.n_embd;
    s.vocab = info.n_vocab;
    s.head_size = info.head_size;
    s.n_ffn = info.n_ffn;
    s.params = static_cast<double>(info.n_params);
    s.embedding = static_cast<double>(info.n_vocab) * info.n_embd;
    s.matrix_params = std::max(0.0, s.params - s.embedding);
    s.description = "RWKV " + std::string(ArchName(info.arch)) + ", " +
                    std::to_string(info.n_layer) + " layers x " + std::to_string(info.n_embd) +
                    ", vocabulary " + std::to_string(info.n_vocab);
    s.source = info.path + " (" + info.format + "; N = the file's parameters less the embedding)";
    s.lora_params_per_rank = LoraPerRank(info.n_layer, info.n_embd, info.n_ffn);
    if (info.arch == Arch::kV4) {
      s.lora_params_per_rank += 2.0 * info.n_layer * info.n_embd;  // as ShapeRwkv4
    } else {
      s.state_floats = static_cast<double>(info.n_layer) * info.n_embd * info.head_size;
    }
  }
  s.stored_bytes = static_cast<double>(info.file_size);
  s.stored_type = info.main_type;
  return s;
}

FlopCount CountTrainingFlops(const ModelShape& shape, double tokens, int ctx_len, int chunk_len) {
  if (!(tokens > 0) || !std::isfinite(tokens)) {
    throw UsageError("--tokens must be a positive number of training tokens, not " +
                     Number(tokens));
  }
  FlopCount f;
  f.tokens = tokens;
  f.terms.push_back(
      {"matrix products", "6 N (forward 2 N, backward 4 N)", 6 * shape.matrix_params, true});
  if (shape.kind == ShapeKind::kRwkv7) {
    const double L = shape.n_layer, C = shape.n_embd, N = shape.head_size, V = shape.vocab;
    // Per state element (H N N = C N per layer) and token, as src/tensor/wkv.cpp and
    // src/train/wkv7_backward.cpp compute it, a multiply-add counted as 2: the forward pass
    // S a (2), S w + sa b + v k (5), S r (2); the backward pass 14 in its first sweep over a
    // state row (dS, dr, dw, db, dk, dv, dsa) and 5 in its second (da, dS w + dsa a); the
    // backward pass recomputes each state from the checkpoint before it (2 + 5).
    f.terms.push_back({"wkv recurrence",
                       "28 L C h (h: head size; forward 9, backward 19 per state element)",
                       28 * L * C * N, true});
    f.terms.push_back({"wkv states recomputed",
                       "7 L C h (aviary's backward, from the checkpoint every 16 tokens)",
                       7 * L * C * N, false});
    f.terms.push_back(
        {"head recomputed", "2 V C (aviary's backward recomputes the logits)", 2 * V * C, false});
    if (ctx_len > 0 && chunk_len > 0 && chunk_len < ctx_len) {
      // ChunkedWindows runs the forward pass again for every chunk but the last, whose
      // activations are still in the graph when the backward pass starts.
      const int chunks = (ctx_len + chunk_len - 1) / chunk_len;
      const double again = static_cast<double>(chunks - 1) * chunk_len / ctx_len;
      char formula[128];
      std::snprintf(formula, sizeof formula,
                    "%.3g (2 N + 9 L C h) (the forward of all chunks but the last)", again);
      f.terms.push_back({"forward recomputed", formula,
                         again * (2 * shape.matrix_params + 9 * L * C * N), false});
    }
  }
  for (const FlopTerm& t : f.terms) {
    if (t.model) f.model_per_token += t.per_token;
    f.executed_per_token += t.per_token;
  }
  return f;
}

const std::vector<GpuSpec>& KnownGpus() {
  // Dense (no 2:4 sparsity) 16-bit tensor-core peaks, from NVIDIA's datasheets and whitepapers
  // (docs/ESTIMATE.md lists each source); datasheets that quote "with sparsity" are halved.
  static const std::vector<GpuSpec> kGpus = {
      {"a100", "NVIDIA A100 (SXM or PCIe, 40 or 80 GB)", 312, "BF16",
       "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"},
      {"h100", "NVIDIA H100 SXM", 989, "BF16",
       "NVIDIA H100 datasheet: SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"},
      {"h100-pcie", "NVIDIA H100 PCIe", 756, "BF16",
       "NVIDIA H100 datasheet: PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity"},
      {"h200", "NVIDIA H200 SXM", 989, "BF16",
       "NVIDIA H200 datasheet: SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"},
      {"a10", "NVIDIA A10", 125, "BF16",
       "NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)"},
      {"l4", "NVIDIA L4", 121, "BF16",
       "NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity"},
      {"rtx4090", "NVIDIA GeForce RTX 4090", 165.2, "BF16, FP32 accumulate",
       "NVIDIA Ada GPU architecture whitepaper: BF16 Tensor TFLOPS with FP32 accumulate 165.2 "
       "(330.4 with sparsity)"},
      {"v100", "NVIDIA V100 SXM2", 125, "FP16 (no BF16)",
       "NVIDIA V100 datasheet: SXM2 Tensor Performance 125 TFLOPS"},
  };
  return kGpus;
}

const GpuSpec& FindGpu(const std::string& name) {
  const std::string key = Lower(name);
  std::vector<std::string> names;
  for (const GpuSpec& g : KnownGpus()) {
    if (g.name == key) return g;
    names.push_back(g.name);
  }
  throw UsageError("unknown GPU '" + name + "': known GPUs are " + Join(names) +
                   " (or give --peak-tflops)");
}

TimeCost EstimateGpuTime(double model_flops, const GpuSetup& g) {
  if (!(g.peak_tflops > 0) || !std::isfinite(g.peak_tflops)) {
    throw UsageError("the peak TFLOP/s must be positive, not " + Number(g.peak_tflops));
  }
  if (g.devices < 1) throw UsageError("--gpus must be at least 1");
  if (g.devices_per_node < 1) throw UsageError("--gpus-per-node must be at least 1");
  if (!(g.utilisation > 0 && g.utilisation <= 1)) {
    throw UsageError("--mfu must be in (0, 1], not " + Number(g.utilisation));
  }
  if (!(g.scaling > 0 && g.scaling <= 1)) {
    throw UsageError("--scaling must be in (0, 1], not " + Number(g.scaling));
  }
  if (!(g.price_per_hour >= 0) || !std::isfinite(g.price_per_hour)) {
    throw UsageError("--price-per-hour must be >= 0, not " + Number(g.price_per_hour));
  }
  TimeCost t;
  const double nodes_factor = g.devices > g.devices_per_node ? g.scaling : 1.0;
  t.flops_per_second = g.devices * g.peak_tflops * 1e12 * g.utilisation * nodes_factor;
  t.wall_seconds = model_flops / t.flops_per_second;
  t.device_hours = t.wall_seconds * g.devices / 3600;
  t.cost = t.device_hours * g.price_per_hour;
  return t;
}

TimeCost EstimateCpuTime(double tokens, double tokens_per_second, double price_per_hour) {
  if (!(tokens_per_second > 0) || !std::isfinite(tokens_per_second)) {
    throw UsageError("--cpu-tokens-per-s must be positive, not " + Number(tokens_per_second));
  }
  if (!(price_per_hour >= 0) || !std::isfinite(price_per_hour)) {
    throw UsageError("--price-per-hour must be >= 0, not " + Number(price_per_hour));
  }
  TimeCost t;
  t.wall_seconds = tokens / tokens_per_second;
  t.device_hours = t.wall_seconds / 3600;
  t.cost = t.device_hours * price_per_hour;
  return t;
}

namespace {
struct WeightType {
  const char* name;
  double bytes;  // per parameter: a block's bytes over its weights
};
// ggml's blocks of 32 weights (q8_0: a 2-byte scale and 32 bytes; q4_0: a scale and 16 bytes;
// q5_0/q5_1/q4_1 likewise) and the K-quants' super-blocks of 256 weights.
constexpr WeightType kWeightTypes[] = {
    {"f32", 4},
    {"f16", 2},
    {"bf16", 2},
    {"q8_0", 34.0 / 32},
    {"q5_1", 24.0 / 32},
    {"q5_0", 22.0 / 32},
    {"q4_1", 20.0 / 32},
    {"q4_0", 18.0 / 32},
    {"q6_k", 210.0 / 256},
    {"q5_k", 176.0 / 256},
    {"q4_k", 144.0 / 256},
};
}  // namespace

std::vector<std::string> KnownWeightTypes() {
  std::vector<std::string> names;
  for (const WeightType& t : kWeightTypes) names.push_back(t.name);
  return names;
}

double BytesPerParam(const std::string& type) {
  const std::string key = Lower(type);
  for (const WeightType& t : kWeightTypes) {
    if (key == t.name) return t.bytes;
  }
  throw UsageError("unknown weight type '" + type + "': known types are " +
                   Join(KnownWeightTypes()));
}

TrainingMemory EstimateMemory(const ModelShape& shape, const MemoryOptions& o) {
  if (o.lora_rank < 1 || o.lora_rank > 65536) throw UsageError("--lora-rank must be 1..65536");
  if (o.batch < 1 || o.batch > 1 << 20) throw UsageError("--batch must be 1..1048576");
  if (o.ctx_len < 1 || o.ctx_len > 1 << 24) throw UsageError("--ctx-len must be 1..16777216");
  if (o.chunk_len < 0 || o.chunk_len > o.ctx_len) {
    throw UsageError("--chunk-len must be 1..--ctx-len (0: the whole window)");
  }
  if (o.devices < 1) throw UsageError("--gpus must be at least 1");
  const int64_t pass = static_cast<int64_t>(o.batch) * (o.chunk_len > 0 ? o.chunk_len : o.ctx_len);
  if (pass > (1 << 24)) {  // aviary train's limit, which also keeps the arena's size in range
    throw UsageError(
        "--batch x --chunk-len (or --ctx-len) must be at most 16777216 tokens per pass");
  }
  TrainingMemory m;
  const double P = shape.params;
  m.full_fp32 = 16 * P;
  m.full_mixed = (2 + 2 + 4 + 4 + 4) * P;
  m.full_zero2_per_device = (2 + (2.0 + 12.0) / o.devices) * P;
  const bool from_file = shape.stored_bytes > 0 && o.base_type.empty();
  if (from_file) {
    m.base = shape.stored_bytes;
    m.base_note = "the file's " + shape.stored_type + " weights as stored";
  } else {
    const std::string type = o.base_type.empty() ? "f32" : o.base_type;
    m.base = BytesPerParam(type) * P;
    m.base_note = Lower(type) + " weights";
  }
  m.lora_params = shape.lora_params_per_rank * o.lora_rank;
  if (m.lora_params > 0) m.lora_total = m.base + 16 * m.lora_params;
  m.state_params = shape.state_floats;
  if (m.state_params > 0) m.state_total = m.base + 16 * m.state_params;
  m.chunk_len = o.chunk_len > 0 ? o.chunk_len : o.ctx_len;
  if (shape.kind == ShapeKind::kRwkv7) {
    m.activations =
        static_cast<double>(Rwkv7Graph::ArenaFloats(shape.rwkv7, o.batch, m.chunk_len)) * 4;
    const int chunks = (o.ctx_len + m.chunk_len - 1) / m.chunk_len;
    if (chunks > 1) {  // what aviary train reports as the chunk start states
      m.chunk_states = static_cast<double>(chunks) * o.batch * shape.n_layer *
                       HeadLayerState::Floats(shape.n_embd, shape.head_size) * 4;
    }
  }
  return m;
}

namespace {
std::string CpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) {
        std::string name = line.substr(colon + 1);
        name.erase(0, name.find_first_not_of(' '));
        return name;
      }
    }
  }
  return "unknown CPU";
}
}  // namespace

CpuMeasurement MeasureCpuTraining(const ModelShape& shape, int batch, int ctx_len, int steps,
                                  int chunk_len) {
  if (shape.kind != ShapeKind::kRwkv7) {
    throw UsageError(
        "--measure trains an RWKV-7 of the shape: give an RWKV-7 preset, file or "
        "--layers/--embd");
  }
  if (batch < 1 || ctx_len < 1 || steps < 1) {
    throw UsageError("--measure needs --batch, --ctx-len and --measure-steps of at least 1");
  }
  const ParamLayout layout = ParamLayout::Rwkv7(shape.rwkv7);
  const size_t P = layout.total_floats();
  const int chunk = chunk_len > 0 && chunk_len < ctx_len ? chunk_len : ctx_len;
  const double need = 16.0 * P + 4.0 * Rwkv7Graph::ArenaFloats(shape.rwkv7, batch, chunk);
  const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  if (memory > 0 && need > 0.9 * memory) {
    const bool weights = 16.0 * P > 0.9 * memory;
    char what[240];
    std::snprintf(what, sizeof what,
                  "--measure: training this shape needs %.1f GiB, more than this machine's "
                  "%.1f GiB: %s",
                  need / (1 << 30), memory / (1 << 30),
                  weights ? "its weights, gradients and Adam moments alone do not fit; measure a "
                            "smaller shape and give --cpu-tokens-per-s"
                          : "measure a smaller --batch, --ctx-len or --chunk-len");
    throw Error(what);
  }
  AlignedVector<float> params(P), grads(P), m(P), v(P);
  InitRwkv7(layout, 0, params.data());
  Rwkv7Graph graph(layout, batch, chunk);
  ChunkedWindows windows(graph, chunk, 0);  // one pass when the chunk is the whole window
  AdamWOptions adam_options;
  adam_options.total_steps = steps + 1;
  const AdamW adam(layout, adam_options);
  std::mt19937 rng(0);
  std::uniform_int_distribution<int32_t> id(0, shape.vocab - 1);
  const size_t M = static_cast<size_t>(batch) * ctx_len;
  std::vector<int32_t> inputs(M), targets(M);
  auto step = [&](int64_t s) {
    for (size_t i = 0; i < M; ++i) {
      inputs[i] = id(rng);
      targets[i] = id(rng);
    }
    std::fill(grads.begin(), grads.end(), 0.0f);
    windows.Gradients(params.data(), grads.data(), inputs, targets, batch, ctx_len,
                      1.0f / static_cast<float>(M));
    adam.ClipGradients(grads.data());
    adam.Step(s, params.data(), grads.data(), m.data(), v.data());
  };
  step(0);  // untimed: first touches of the buffers, the thread pool starting
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 1; s <= steps; ++s) step(s);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CpuMeasurement r;
  r.seconds = seconds;
  r.steps = steps;
  r.batch = batch;
  r.ctx_len = ctx_len;
  r.chunk_len = chunk;
  r.threads = NumThreads();
  r.tokens_per_second = static_cast<double>(M) * steps / std::max(seconds, 1e-9);
  r.cpu = CpuModelName();
  return r;
}

}  // namespace aviary::train
