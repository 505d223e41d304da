// aviary estimate: what training a model on D tokens would cost on given hardware: FLOPs,
// device-hours, wall time, price and memory, with every assumption printed first
// (src/train/estimate.h; docs/ESTIMATE.md).
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "aviary/error.h"
#include "cli_common.h"
#include "environment.h"
#include "tensor/thread_pool.h"
#include "train/estimate.h"

namespace aviary::cli {
namespace {

using train::ModelShape;

struct EstimateCli {
  std::string preset, model, arch = "rwkv7", tokens, params, gpu;
  int layers = 0, embd = 0, vocab = 65536;
  int gpus = 1, gpus_per_node = 8;
  double peak_tflops = 0, mfu = 0.4, scaling = 0.9, price = 0, cpu_tokens_per_s = 0;
  bool measure = false, json = false;
  int measure_steps = 3, threads = 0;
  train::MemoryOptions memory;
  CLI::App* cmd = nullptr;
};

// "2e12", "2T", "330B", "1.5M", "70e9": a positive count.
double ParseCount(const std::string& flag, const std::string& text) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  double scale = 1;
  if (used > 0 && used + 1 == text.size()) {
    switch (text.back()) {
      case 'k':
      case 'K': scale = 1e3; break;
      case 'm':
      case 'M': scale = 1e6; break;
      case 'b':
      case 'B':
      case 'g':
      case 'G': scale = 1e9; break;
      case 't':
      case 'T': scale = 1e12; break;
      default: used = 0;
    }
  } else if (used != text.size()) {
    used = 0;
  }
  if (used == 0 || !(x > 0) || !std::isfinite(x * scale)) {
    throw UsageError(flag + " takes a positive number such as 2e12 or 2T (K, M, B, T), not '" +
                     text + "'");
  }
  return x * scale;
}

// A count as people write parameters and tokens: 1234567 -> "1.23 M", 7e10 -> "70 B".
std::string Si(double x) {
  const char* units[] = {"", " K", " M", " B", " T"};
  int u = 0;
  while (std::fabs(x) >= 1000 && u < 4) {
    x /= 1000;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g%s", x, units[u]);
  return buf;
}

std::string Sci(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", x);
  return buf;
}

std::string Number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

std::string Bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (b >= 1024 && u < 5) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return buf;
}

std::string Duration(double s) {
  char buf[64];
  if (s < 120) {
    std::snprintf(buf, sizeof buf, "%.1f s", s);
  } else if (s < 2 * 3600) {
    std::snprintf(buf, sizeof buf, "%.1f min", s / 60);
  } else if (s < 3 * 86400) {
    std::snprintf(buf, sizeof buf, "%.1f hours", s / 3600);
  } else if (s < 365.25 * 86400) {
    std::snprintf(buf, sizeof buf, "%.1f days (%.0f hours)", s / 86400, s / 3600);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f years (%.0f days)", s / (365.25 * 86400), s / 86400);
  }
  return buf;
}

// "$1,234,567" (whole dollars from $1,000, cents below).
std::string Money(double usd) {
  char buf[48];
  if (usd < 1000) {
    std::snprintf(buf, sizeof buf, "$%.2f", usd);
    return buf;
  }
  std::snprintf(buf, sizeof buf, "%.0f", usd);
  std::string digits = buf, out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return "$" + out;
}

void Row(const std::string& name, const std::string& value) {
  std::printf("  %-24s %s\n", name.c_str(), value.c_str());
}

ModelShape ResolveShape(const EstimateCli& c) {
  const int given =
      !c.preset.empty() + !c.model.empty() + !c.params.empty() + (c.layers > 0 || c.embd > 0);
  if (given != 1) {
    throw UsageError(
        "give the model one way: --preset NAME, --model FILE, --layers L --embd C, or --params N");
  }
  if ((c.cmd->count("--vocab") > 0 || c.cmd->count("--arch") > 0) && c.layers == 0 && c.embd == 0) {
    throw UsageError("--vocab and --arch describe a --layers/--embd shape");
  }
  if (!c.preset.empty()) return train::ShapeFromPreset(c.preset);
  if (!c.params.empty()) return train::ShapeGeneric(ParseCount("--params", c.params));
  if (!c.model.empty()) {
    const std::string path = ResolveModelArgument(c.model, Hub().cache_dir);
    LoadOptions load;
    const std::unique_ptr<Model> model = Model::Load(path, load);
    return train::ShapeFromModelInfo(model->info());
  }
  if (c.layers < 1 || c.embd < 1) throw UsageError("--layers and --embd go together");
  return c.arch == "rwkv4" ? train::ShapeRwkv4(c.layers, c.embd, c.vocab)
                           : train::ShapeRwkv7(c.layers, c.embd, c.vocab);
}

void RunEstimate(EstimateCli& c) {
  if (c.tokens.empty()) throw UsageError("--tokens is required (e.g. --tokens 2e12 or 330B)");
  const double tokens = ParseCount("--tokens", c.tokens);
  const int hardware = !c.gpu.empty() + (c.cmd->count("--peak-tflops") > 0) +
                       (c.cmd->count("--cpu-tokens-per-s") > 0) + c.measure;
  if (hardware > 1) {
    throw UsageError(
        "give the hardware one way: --gpu, --peak-tflops, --cpu-tokens-per-s or "
        "--measure");
  }
  // Checked whatever the hardware, so a mistyped value is never silently unused.
  if (!(c.mfu > 0 && c.mfu <= 1)) throw UsageError("--mfu must be in (0, 1]");
  if (!(c.scaling > 0 && c.scaling <= 1)) throw UsageError("--scaling must be in (0, 1]");
  const ModelShape shape = ResolveShape(c);
  const train::FlopCount flops =
      train::CountTrainingFlops(shape, tokens, c.memory.ctx_len, c.memory.chunk_len);
  c.memory.devices = c.gpus;
  const train::TrainingMemory mem = train::EstimateMemory(shape, c.memory);

  // Hardware and its time.
  enum { kNone, kGpu, kCpu } kind = kNone;
  std::string hw_label, hw_source, unit = "device";
  train::GpuSetup setup;
  train::TimeCost time;
  train::CpuMeasurement measured;
  double cpu_tps = 0;
  if (!c.gpu.empty() || c.cmd->count("--peak-tflops") > 0) {
    kind = kGpu;
    if (!c.gpu.empty()) {
      const train::GpuSpec& g = train::FindGpu(c.gpu);
      setup.peak_tflops = g.peak_tflops;
      hw_label = g.label + ", " + Number(g.peak_tflops) + " TFLOP/s dense " + g.precision;
      hw_source = g.source;
      unit = g.name;
      for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    } else {
      setup.peak_tflops = c.peak_tflops;
      hw_label = Number(c.peak_tflops) + " TFLOP/s per device";
      hw_source = "--peak-tflops";
    }
    setup.devices = c.gpus;
    setup.devices_per_node = c.gpus_per_node;
    setup.utilisation = c.mfu;
    setup.scaling = c.scaling;
    setup.price_per_hour = c.price;
    time = train::EstimateGpuTime(flops.model_total(), setup);
  } else if (c.cmd->count("--cpu-tokens-per-s") > 0 || c.measure) {
    kind = kCpu;
    unit = "machine";
    if (c.gpus != 1) throw UsageError("a CPU estimate is for one machine: drop --gpus");
    if (c.measure) {
      RuntimeOptions r;
      r.threads = c.threads > 0 ? c.threads : ProcessEnvironment().threads.value_or(0);
      r.kernels = ProcessEnvironment().kernels.value_or(Kernels::kFast);
      Runtime runtime(r);
      ScopedRuntime scope(&runtime);
      measured = train::MeasureCpuTraining(shape, c.memory.batch, c.memory.ctx_len, c.measure_steps,
                                           c.memory.chunk_len);
      cpu_tps = measured.tokens_per_second;
      hw_label = measured.cpu + ", " + std::to_string(measured.threads) + " threads";
      char src[240];
      std::snprintf(src, sizeof src,
                    "measured here: %d aviary training steps of %d x %d tokens in %.2f s",
                    measured.steps, measured.batch, measured.ctx_len, measured.seconds);
      if (measured.chunk_len < measured.ctx_len) {
        std::snprintf(src + std::strlen(src), sizeof src - std::strlen(src), " (chunks of %d)",
                      measured.chunk_len);
      }
      hw_source = src;
    } else {
      cpu_tps = c.cpu_tokens_per_s;
      hw_label = "one CPU machine";
      hw_source = "--cpu-tokens-per-s (a measured aviary training throughput)";
    }
    time = train::EstimateCpuTime(tokens, cpu_tps, c.price);
    time.flops_per_second = flops.model_per_token * cpu_tps;
  } else if (c.price > 0 || c.gpus != 1) {
    throw UsageError(
        "--price-per-hour and --gpus need the hardware: --gpu NAME, --peak-tflops, "
        "--cpu-tokens-per-s or --measure");
  }

  if (c.json) {
    nlohmann::json j;
    j["model"] = {{"description", shape.description},
                  {"source", shape.source},
                  {"parameters", shape.params},
                  {"embedding_parameters", shape.embedding},
                  {"matrix_parameters", shape.matrix_params}};
    j["tokens"] = tokens;
    nlohmann::json terms = nlohmann::json::array();
    for (const train::FlopTerm& t : flops.terms) {
      terms.push_back({{"name", t.name},
                       {"formula", t.formula},
                       {"per_token", t.per_token},
                       {"total", t.per_token * tokens},
                       {"in_model_flops", t.model}});
    }
    j["flops"] = {{"terms", terms},
                  {"model_per_token", flops.model_per_token},
                  {"model_total", flops.model_total()},
                  {"executed_per_token", flops.executed_per_token},
                  {"executed_total", flops.executed_total()}};
    if (kind == kGpu) {
      j["hardware"] = {{"kind", "gpu"},
                       {"label", hw_label},
                       {"source", hw_source},
                       {"peak_tflops", setup.peak_tflops},
                       {"devices", setup.devices},
                       {"devices_per_node", setup.devices_per_node},
                       {"mfu", setup.utilisation},
                       {"scaling", setup.scaling},
                       {"price_per_hour", setup.price_per_hour}};
    } else if (kind == kCpu) {
      j["hardware"] = {{"kind", "cpu"},
                       {"label", hw_label},
                       {"source", hw_source},
                       {"tokens_per_second", cpu_tps},
                       {"price_per_hour", c.price}};
      if (c.measure) j["hardware"]["measured_seconds"] = measured.seconds;
    }
    if (kind != kNone) {
      j["time"] = {{"flops_per_second", time.flops_per_second},
                   {"wall_seconds", time.wall_seconds},
                   {"device_hours", time.device_hours},
                   {"cost_usd", time.cost}};
    }
    j["memory"] = {{"full_finetune_fp32_bytes", mem.full_fp32},
                   {"full_finetune_mixed_bytes", mem.full_mixed},
                   {"full_finetune_zero2_per_device_bytes", mem.full_zero2_per_device},
                   {"base_bytes", mem.base},
                   {"base", mem.base_note},
                   {"lora_rank", c.memory.lora_rank},
                   {"lora_parameters", mem.lora_params},
                   {"lora_bytes", mem.lora_total},
                   {"state_parameters", mem.state_params},
                   {"state_tuning_bytes", mem.state_total},
                   {"activation_bytes", mem.activations},
                   {"chunk_state_bytes", mem.chunk_states},
                   {"batch", c.memory.batch},
                   {"chunk_len", mem.chunk_len}};
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }

  std::printf("Model\n");
  Row("shape", shape.description);
  Row("from", shape.source);
  std::string counts = Si(shape.params) + " parameters";
  if (shape.embedding > 0) counts += " (embedding " + Si(shape.embedding) + ")";
  Row("parameters", counts);
  Row("N (matrices, head in)",
      Si(shape.matrix_params) + (shape.kind == train::ShapeKind::kGeneric
                                     ? "  (--params: every parameter, embedding in)"
                                     : "  (every matrix but the embedding lookup)"));

  std::printf("\nAssumptions\n");
  Row("training tokens D", Si(tokens) + " (" + Sci(tokens) + ")");
  if (kind == kGpu) {
    Row("hardware", hw_label);
    Row("  peak from", hw_source);
    char line[160];
    std::snprintf(line, sizeof line, "%d (%d per node)", setup.devices, setup.devices_per_node);
    Row("devices", line);
    std::snprintf(line, sizeof line, "%.3g of peak%s", setup.utilisation,
                  c.cmd->count("--mfu") ? " (--mfu)"
                                        : " (default: LLaMA-2 70B's run implies 0.435, PaLM "
                                          "reports 0.462; see docs/ESTIMATE.md)");
    Row("utilisation (MFU)", line);
    if (setup.devices > setup.devices_per_node) {
      std::snprintf(line, sizeof line, "%.3g (more than one node)", setup.scaling);
    } else {
      std::snprintf(line, sizeof line, "1 (one node; %.3g applies beyond %d devices)",
                    setup.scaling, setup.devices_per_node);
    }
    Row("multi-node efficiency", line);
  } else if (kind == kCpu) {
    Row("hardware", hw_label);
    Row("throughput", Si(cpu_tps) + " tokens/s, " + hw_source);
  } else {
    Row("hardware", "none given (--gpu, --peak-tflops, --cpu-tokens-per-s or --measure)");
  }
  if (kind != kNone) {
    Row("price", c.price > 0 ? Money(c.price) + " per " + unit + "-hour" : "none given");
  }

  std::printf("\nTraining FLOPs              per token    total        share\n");
  for (const train::FlopTerm& t : flops.terms) {
    char line[256];
    std::snprintf(line, sizeof line, "  %-24s %-12s %-12s %5.1f%%  %s%s\n", t.name.c_str(),
                  Sci(t.per_token).c_str(), Sci(t.per_token * tokens).c_str(),
                  100 * t.per_token / flops.executed_per_token, t.formula.c_str(),
                  t.model ? "" : " [not model FLOPs]");
    std::printf("%s", line);
  }
  std::printf("  %-24s %-12s %s\n", "model FLOPs", Sci(flops.model_per_token).c_str(),
              Sci(flops.model_total()).c_str());
  if (flops.executed_per_token != flops.model_per_token) {
    std::printf("  %-24s %-12s %s\n", "executed by aviary", Sci(flops.executed_per_token).c_str(),
                Sci(flops.executed_total()).c_str());
  }
  if (shape.kind == train::ShapeKind::kRwkv7) {
    Row("not counted", "element-wise work (norms, token shift, activations), linear in C");
    Row("context length", "no term: RWKV's cost per token does not grow with it");
  }

  if (kind != kNone) {
    std::printf("\nTime and cost\n");
    Row("delivered", Sci(time.flops_per_second) + " model FLOP/s" +
                         (kind == kCpu ? " (measured throughput x model FLOPs per token)" : ""));
    Row(unit + "-hours",
        Si(time.device_hours) +
            (time.device_hours >= 1000 ? " (" + Sci(time.device_hours) + ")" : ""));
    Row("wall time", Duration(time.wall_seconds));
    Row("cost", c.price > 0 ? Money(time.cost) : "(give --price-per-hour)");
  }

  if (mem.activations > 0) {
    std::printf("\nMemory to train (activations for batch %d x %d tokens per chunk)\n",
                c.memory.batch, mem.chunk_len);
  } else {
    std::printf("\nMemory to train\n");
  }
  Row("full, aviary (f32)", Bytes(mem.full_fp32) + "  weights, gradients, Adam m, v: 16 B/param");
  Row("full, mixed precision",
      Bytes(mem.full_mixed) + "  bf16 weights 2 + grads 2, f32 master 4 + m 4 + v 4");
  if (c.gpus > 1) {
    Row("  ZeRO-2, per device", Bytes(mem.full_zero2_per_device) + "  over " +
                                    std::to_string(c.gpus) + " devices: 2 + 14 / devices B/param");
  }
  Row("frozen base", Bytes(mem.base) + "  " + mem.base_note);
  if (mem.lora_params > 0) {
    Row("LoRA rank " + std::to_string(c.memory.lora_rank),
        Bytes(mem.lora_total) + "  base + " + Si(mem.lora_params) +
            " adapter params x 16 B (r, k, v, o, ffn key, value)");
  } else {
    Row("LoRA", "needs the model's shape");
  }
  if (mem.state_params > 0) {
    Row("state tuning",
        Bytes(mem.state_total) + "  base + " + Si(mem.state_params) + " state floats x 16 B");
  } else {
    Row("state tuning", shape.kind == train::ShapeKind::kGeneric
                            ? "needs the model's shape"
                            : "no matrix-valued state to tune (RWKV-4)");
  }
  if (mem.activations > 0) {
    Row("+ activations", Bytes(mem.activations) +
                             "  aviary's graph (f32), every mode: the backward pass runs "
                             "through all layers");
    if (mem.chunk_states > 0) {
      Row("+ chunk start states", Bytes(mem.chunk_states) + "  each chunk's start state, " +
                                      std::to_string(c.memory.batch) + " x " +
                                      std::to_string(c.memory.ctx_len) + "-token windows");
    }
  } else {
    Row("+ activations", "not modelled for this shape (aviary's graph is RWKV-7's)");
  }
  CheckStdout();
}

}  // namespace

void RegisterEstimate(CLI::App& app) {
  auto c = std::make_shared<EstimateCli>();
  CLI::App* cmd = app.add_subcommand(
      "estimate",
      "What training would cost: FLOPs, device-hours, wall time, price and memory, with the "
      "assumptions printed first");
  c->cmd = cmd;
  cmd->add_option("--preset", c->preset,
                  "An official shape: rwkv7-0.1b, rwkv7-0.4b, rwkv7-1.5b, rwkv7-2.9b, "
                  "rwkv7-7.2b, rwkv4-1.5b, rwkv4-14b");
  cmd->add_option("--model", c->model, "A model file (any version aviary reads) or cache name");
  cmd->add_option("--layers", c->layers, "Layers of the shape (with --embd)");
  cmd->add_option("--embd", c->embd, "Width of the shape (with --layers)");
  cmd->add_option("--vocab", c->vocab, "Vocabulary of the shape")->capture_default_str();
  cmd->add_option("--arch", c->arch, "Version of the --layers/--embd shape")
      ->check(CLI::IsMember({"rwkv7", "rwkv4"}))
      ->capture_default_str();
  cmd->add_option("--params", c->params,
                  "Only a parameter count (e.g. 70e9 or 70B): 6 N D, no RWKV terms");
  cmd->add_option("--tokens", c->tokens, "Training tokens D (e.g. 2e12, 2T, 330B)");
  cmd->add_option("--gpu", c->gpu,
                  "GPU model: a100, h100, h100-pcie, h200, a10, l4, rtx4090, v100");
  cmd->add_option("--peak-tflops", c->peak_tflops, "Peak dense TFLOP/s per device (another GPU)");
  cmd->add_option("--gpus", c->gpus, "Devices")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--gpus-per-node", c->gpus_per_node,
                  "Devices per node (--scaling applies beyond one node)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  cmd->add_option("--mfu", c->mfu, "Model FLOPs utilisation: the fraction of peak delivered")
      ->capture_default_str();
  cmd->add_option("--scaling", c->scaling, "Multi-node efficiency (beyond one node)")
      ->capture_default_str();
  cmd->add_option("--price-per-hour", c->price, "USD per device-hour (or CPU machine-hour)");
  cmd->add_option("--cpu-tokens-per-s", c->cpu_tokens_per_s,
                  "A CPU machine: a measured aviary training throughput of this shape");
  cmd->add_flag("--measure", c->measure,
                "A CPU machine: measure this shape's aviary training throughput here (random "
                "weights and tokens, --batch x --ctx-len)");
  cmd->add_option("--measure-steps", c->measure_steps, "Timed steps of --measure")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd->add_option("--threads", c->threads,
                  "Threads of --measure (default: $AVIARY_THREADS, else the hardware threads)")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--batch", c->memory.batch, "Sequences per step (activations, --measure)")
      ->capture_default_str();
  cmd->add_option("--ctx-len", c->memory.ctx_len, "Tokens per sequence")->capture_default_str();
  cmd->add_option("--chunk-len", c->memory.chunk_len,
                  "Chunks of N tokens per window, as aviary train --chunk-len runs them (0: the "
                  "whole window)")
      ->capture_default_str();
  cmd->add_option("--lora-rank", c->memory.lora_rank, "LoRA rank")->capture_default_str();
  cmd->add_option("--base-type", c->memory.base_type,
                  "Type of the frozen base for LoRA and state tuning: f32, f16, bf16, q8_0, q4_0, "
                  "... (default: a file's own, else f32)");
  cmd->add_flag("--json", c->json, "Print JSON");
  cmd->callback([c] { RunEstimate(*c); });
}

}  // namespace aviary::cli
