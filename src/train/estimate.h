// What training a model would cost: its training FLOPs, the device-hours, wall time and price on
// a given hardware, and the memory a full finetune, LoRA and state tuning each need (aviary
// estimate; docs/ESTIMATE.md derives every formula and cites every number).
//
// Everything here but MeasureCpuTraining is arithmetic on a ModelShape: no weights are read, so a
// 70B estimate takes no memory. Bad input throws aviary::UsageError naming the value.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "aviary/model.h"
#include "train/params.h"

namespace aviary::train {

enum class ShapeKind {
  kRwkv7,    // the exact RWKV-7 layout (ParamLayout::Rwkv7): every term below is known
  kRwkv,     // another RWKV version: layers, width and matrices known, not aviary's graph
  kGeneric,  // only a parameter count (--params): 6 N D and nothing that needs a shape
};

struct ModelShape {
  std::string description;  // "RWKV-7, 12 layers x 768, vocabulary 65536, head size 64"
  std::string source;       // where the shape came from ("preset rwkv7-0.1b: BlinkDL's L12-D768")
  ShapeKind kind = ShapeKind::kGeneric;
  Rwkv7Config rwkv7;                                                 // kRwkv7 only
  int n_layer = 0, n_embd = 0, vocab = 0, head_size = 0, n_ffn = 0;  // 0: unknown (kGeneric)
  double params = 0;                                                 // every parameter
  double embedding = 0;             // the embedding table: a lookup, no products
  double matrix_params = 0;         // N of 6 N D: the matrices the products run over, head included
  double lora_params_per_rank = 0;  // adapters per unit of rank (0: unknown)
  double state_floats = 0;  // the wkv state per sequence, what state tuning trains (0: none)
  // A model file: its weights' bytes and main type as stored (0 / empty for a computed shape).
  double stored_bytes = 0;
  std::string stored_type;
};

// Official shapes by name (rwkv7-0.1b ... rwkv7-7.2b, rwkv4-1.5b, rwkv4-14b).
struct ShapePreset {
  std::string name;
  std::string note;  // where the shape is from
  bool rwkv7;
  int n_layer, n_embd, vocab;
};
const std::vector<ShapePreset>& ShapePresets();
// Throws UsageError listing the known names.
ModelShape ShapeFromPreset(const std::string& name);
// RWKV-7 of the official sizes for L layers of width C (Rwkv7Config::Official).
ModelShape ShapeRwkv7(int n_layer, int n_embd, int vocab);
// RWKV-4: per layer the time mix's r, k, v, output (C x C) and the channel mix's key (4C x C),
// value (C x 4C) and receptance (C x C).
ModelShape ShapeRwkv4(int n_layer, int n_embd, int vocab);
// A transformer (or anything) known only by its parameter count, all of them counted as matrix
// parameters.
ModelShape ShapeGeneric(double params);
// From a loaded model's header: RWKV-7 files get the official layout with the file's head size
// and channel-mix width; other versions their parameter count less the embedding.
ModelShape ShapeFromModelInfo(const ModelInfo& info);

// One term of the training FLOPs per token.
struct FlopTerm {
  std::string name;
  std::string formula;
  double per_token = 0;
  bool model = true;  // counted in model FLOPs (what utilisation/MFU is a fraction of); false:
                      // work aviary does again (recomputation), only in the executed FLOPs
};
struct FlopCount {
  std::vector<FlopTerm> terms;
  double model_per_token = 0, executed_per_token = 0;
  double tokens = 0;
  double model_total() const { return model_per_token * tokens; }
  double executed_total() const { return executed_per_token * tokens; }
};
// Throws UsageError unless tokens > 0. A window of ctx_len tokens trained in chunks of
// chunk_len (chunked.h) recomputes the forward pass of every chunk but its last; 0 for either:
// one pass per window.
FlopCount CountTrainingFlops(const ModelShape& shape, double tokens, int ctx_len = 0,
                             int chunk_len = 0);

struct GpuSpec {
  std::string name;    // what --gpu takes
  std::string label;   // "NVIDIA A100 (SXM or PCIe)"
  double peak_tflops;  // dense 16-bit tensor throughput, FP32 accumulate
  std::string precision;
  std::string source;
};
const std::vector<GpuSpec>& KnownGpus();
// Case-insensitive; throws UsageError listing the known names.
const GpuSpec& FindGpu(const std::string& name);

struct GpuSetup {
  double peak_tflops = 0;  // per device
  int devices = 1;
  int devices_per_node = 8;
  double utilisation = 0.4;   // model FLOPs utilisation (MFU), in (0, 1]
  double scaling = 0.9;       // multi-node efficiency in (0, 1], when devices > devices_per_node
  double price_per_hour = 0;  // per device, USD; 0: no cost
};
struct TimeCost {
  double flops_per_second = 0;  // the model FLOPs the whole setup delivers
  double wall_seconds = 0;
  double device_hours = 0;  // wall time x devices (machine-hours for a CPU)
  double cost = 0;          // device_hours x price
};
// Throws UsageError for a setup out of range.
TimeCost EstimateGpuTime(double model_flops, const GpuSetup& setup);
// One machine training at `tokens_per_second` (measured for this shape); price per hour of it.
TimeCost EstimateCpuTime(double tokens, double tokens_per_second, double price_per_hour);

// Bytes per parameter of a stored weight type: f32 4, f16/bf16 2, q8_0 34/32, q4_0 18/32, ...
// Case-insensitive; throws UsageError listing the known ones.
double BytesPerParam(const std::string& type);
std::vector<std::string> KnownWeightTypes();

struct MemoryOptions {
  // The frozen base's type for LoRA and state tuning; empty: a file's own bytes, else f32.
  std::string base_type;
  int lora_rank = 32;
  int batch = 8;
  int ctx_len = 512;
  int chunk_len = 0;  // tokens per forward/backward (0: ctx_len); the state carries between
  int devices = 1;    // for the per-device ZeRO-2 line
};
struct TrainingMemory {
  double full_fp32 = 0;              // aviary: f32 weights, gradients, Adam m and v (16 B/param)
  double full_mixed = 0;             // bf16 weights + grads, f32 master + m + v (16 B/param)
  double full_zero2_per_device = 0;  // full_mixed with grads and optimizer sharded (ZeRO-2)
  double base = 0;                   // the frozen weights in base_type (or the file's bytes)
  std::string base_note;
  double lora_params = 0, lora_total = 0;    // adapters; base + 16 B per adapter parameter
  double state_params = 0, state_total = 0;  // the wkv state; base + 16 B per state float
  double activations = 0;   // aviary's graph for batch x chunk tokens (0: unknown shape)
  double chunk_states = 0;  // the start state of every chunk of a window, when chunked
  int chunk_len = 0;        // the chunk used
};
// Throws UsageError for options out of range.
TrainingMemory EstimateMemory(const ModelShape& shape, const MemoryOptions& options);

// Runs `steps` real training steps (forward, backward, clipping, AdamW) of a randomly initialised
// RWKV-7 of this shape on random tokens, after one untimed step, on the current thread runtime:
// windows of ctx_len tokens, in chunks of chunk_len when 0 < chunk_len < ctx_len (as aviary
// train runs them); returns training tokens per second. Throws aviary::Error when the model
// does not fit in memory.
struct CpuMeasurement {
  double tokens_per_second = 0;
  double seconds = 0;
  int steps = 0, batch = 0, ctx_len = 0, chunk_len = 0, threads = 0;
  std::string cpu;  // /proc/cpuinfo's model name, or "unknown CPU"
};
CpuMeasurement MeasureCpuTraining(const ModelShape& shape, int batch, int ctx_len, int steps,
                                  int chunk_len = 0);

}  // namespace aviary::train
