// aviary bench: load time, prompt processing (sequence mode) and generation (one token at a
// time) speed, peak memory; medians over repeats; optionally batched decoding (N sequences
// decoding together through EvalBatch), a read-bandwidth probe and the bandwidth bound it
// implies for generation.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "cli_common.h"
#include "formats/mapped_file.h"
#include "formats/weight_file.h"
#include "models/model_impl.h"
#include "tensor/thread_pool.h"

namespace aviary::cli {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

uint64_t PeakRssBytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<uint64_t>(ru.ru_maxrss) * 1024;  // Linux: KiB
}

// Deterministic token ids spread over the vocabulary.
std::vector<int32_t> BenchTokens(int n, int vocab) {
  std::vector<int32_t> t(n);
  uint64_t x = 12345;
  for (auto& v : t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<int32_t>((x >> 33) % static_cast<uint64_t>(vocab));
  }
  return t;
}

int ArgMax(const std::vector<float>& v) {
  return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
}

// STREAM-like read bandwidth: every thread sums its share of a buffer much larger than the
// caches; best of several passes, in GB/s (1e9 bytes).
double ReadBandwidthGBs(size_t bytes, int threads) {
  const size_t n = bytes / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buf(new uint64_t[n]);
  ParallelFor(
      64,
      [&](int64_t task, int) {
        const size_t b = n * task / 64, e = n * (task + 1) / 64;
        for (size_t i = b; i < e; ++i) buf[i] = i * 0x9e3779b97f4a7c15ull;
      },
      threads);
  const int64_t chunks = 256;
  std::vector<uint64_t> sums(chunks);
  double best = 0;
  for (int pass = 0; pass < 7; ++pass) {
    const auto t0 = Clock::now();
    ParallelFor(
        chunks,
        [&](int64_t task, int) {
          const size_t b = n * task / chunks, e = n * (task + 1) / chunks;
          uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
          size_t i = b;
          for (; i + 4 <= e; i += 4) {
            a0 += buf[i];
            a1 += buf[i + 1];
            a2 += buf[i + 2];
            a3 += buf[i + 3];
          }
          for (; i < e; ++i) a0 += buf[i];
          sums[task] = a0 + a1 + a2 + a3;
        },
        threads);
    const double s = Seconds(t0, Clock::now());
    best = std::max(best, static_cast<double>(n * sizeof(uint64_t)) / s / 1e9);
  }
  volatile uint64_t sink = 0;
  for (uint64_t s : sums) sink = sink + s;
  return best;
}

struct WeightStats {
  uint64_t bytes_per_token = 0;  // weight bytes read per generated token
  uint64_t macs_per_token = 0;   // matrix multiply-adds per token
};

// Every tensor is read once per token except the embedding, of which one row is.
WeightStats StatsOf(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path, LoadMode::kMmap);  // headers only: never read
  const WeightFile wf = ReadWeightFile(file->bytes(), path);
  WeightStats s;
  for (const auto& [name, t] : wf.tensors) {
    if (name == "emb.weight") {
      s.bytes_per_token += t.row_bytes();
      continue;
    }
    s.bytes_per_token += t.nbytes;
    if (t.shape.size() >= 2) s.macs_per_token += static_cast<uint64_t>(t.numel());
  }
  return s;
}

std::string JsonList(const std::vector<double>& v) {
  std::string s = "[";
  char buf[32];
  for (size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.4g", i ? ", " : "", v[i]);
    s += buf;
  }
  return s + "]";
}

std::string JsonString(const std::string& in) {
  std::string s = "\"";
  for (char c : in) {
    if (c == '"' || c == '\\') s += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      s += buf;
      continue;
    }
    s += c;
  }
  return s + "\"";
}

// Batched decoding: `n` sequences, each first fed its own short prompt (together), then
// `steps` greedy steps of one token per sequence, all sequences in one EvalBatch per step.
// Returns the aggregate tokens per second of the timed steps (after one untimed step that
// sizes the scratch for this batch).
double BatchDecodeTokS(const Model& model, int n, int steps) {
  constexpr int kPromptPerSeq = 16;
  const std::vector<int32_t> prompts = BenchTokens(n * kPromptPerSeq, model.info().n_vocab);
  std::vector<State> states(n, model.NewState());
  std::vector<std::vector<float>> logits(n);
  std::vector<int32_t> next(n);
  std::vector<BatchItem> items(n);
  for (int i = 0; i < n; ++i) {
    items[i] = {std::span(prompts).subspan(static_cast<size_t>(i) * kPromptPerSeq, kPromptPerSeq),
                &states[i], &logits[i]};
  }
  model.EvalBatch(items);
  auto step = [&] {
    for (int i = 0; i < n; ++i) {
      next[i] = ArgMax(logits[i]);
      items[i].tokens = std::span(&next[i], 1);
    }
    model.EvalBatch(items);
  };
  step();
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) step();
  return static_cast<double>(n) * steps / Seconds(t0, Clock::now());
}

}  // namespace

void RegisterBench(CLI::App& app) {
  struct Options {
    std::string model;
    int prompt_tokens = 512, gen_tokens = 128, repeat = 3;
    bool json = false, bandwidth = false;
    int bandwidth_mib = 1024;
    std::vector<int> batch;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd =
      app.add_subcommand("bench", "Measure load time, prompt and generation speed and peak memory");
  cmd->add_option("--model", o->model, "Model file (or a name pulled into the cache)");
  AddRuntimeOptions(cmd);
  cmd->add_option("--prompt-tokens", o->prompt_tokens, "Tokens fed in sequence mode")
      ->capture_default_str();
  cmd->add_option("--gen-tokens", o->gen_tokens, "Tokens generated one at a time")
      ->capture_default_str();
  cmd->add_option("--repeat", o->repeat, "Repeats (medians are reported)")->capture_default_str();
  cmd->add_option("--batch", o->batch,
                  "Also measure batched decoding: N sequences decoding together, for each N of "
                  "a comma-separated list (e.g. 1,4,16)")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  cmd->add_flag("--json", o->json, "Print the results as one JSON object");
  cmd->add_flag("--bandwidth", o->bandwidth,
                "Also measure read bandwidth and the generation speed it bounds");
  cmd->add_option("--bandwidth-mib", o->bandwidth_mib, "Buffer size of the bandwidth probe")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->callback([o] {
    if (o->prompt_tokens < 1 || o->gen_tokens < 0 || o->repeat < 1) {
      throw UsageError("--prompt-tokens and --repeat must be >= 1, --gen-tokens >= 0");
    }
    if (!o->batch.empty() && o->gen_tokens < 1) {
      throw UsageError("--batch needs --gen-tokens >= 1 (the decoding steps it times)");
    }
    if (o->model.empty() && !o->bandwidth) throw UsageError("give --model FILE (or --bandwidth)");
    const LoadOptions load_options = ModelLoadOptions();
    Runtime& runtime = *load_options.runtime;
    const ScopedRuntime on_runtime(&runtime);  // the bandwidth probe runs on the model's threads
    const int threads = runtime.threads();
    const std::string kernels =
        runtime.options().kernels == Kernels::kReference ? "reference" : "fast";
    const std::string target = runtime.kernel_target();
    // What quantized matrices multiply: 8-bit activations with integer dot products, or floats;
    // and F16/BF16 ones: bfloat16 activations with bfloat16 dot products, or floats.
    const std::string activations = runtime.int8_activations() ? "int8" : "f32";
    const std::string activations_16 = runtime.bf16_activations() ? "bf16" : "f32";

    // Measured after the model runs, so that its buffer does not count in the peak RSS.
    double bandwidth = 0;
    auto probe = [&] {
      if (o->bandwidth) {
        bandwidth = ReadBandwidthGBs(static_cast<size_t>(o->bandwidth_mib) << 20, threads);
      }
    };
    if (o->model.empty()) {
      probe();
      if (o->json) {
        std::printf("{\"threads\": %d, \"read_bandwidth_gb_s\": %.2f}\n", threads, bandwidth);
      } else {
        std::printf(
            "threads:        %d\nread bandwidth: %.2f GB/s (best of 7 passes over %d MiB)\n",
            threads, bandwidth, o->bandwidth_mib);
      }
      return;
    }

    const std::string path = ResolveModelArgument(o->model, Hub().cache_dir);
    std::vector<double> load_ms, prompt_tps, gen_tps;
    std::unique_ptr<Model> model;
    for (int r = 0; r < o->repeat; ++r) {
      model.reset();
      const auto t0 = Clock::now();
      model = Model::Load(path, load_options);
      load_ms.push_back(1e3 * Seconds(t0, Clock::now()));
    }
    const ModelInfo& info = model->info();
    const WeightStats ws = StatsOf(path);
    const std::vector<int32_t> prompt = BenchTokens(o->prompt_tokens, info.n_vocab);

    {  // warm-up: pages the weights in and sizes every scratch buffer once (a whole chunk:
       // a shorter warm-up left the first timed prompt growing buffers and faulting pages in)
      State s = model->NewState();
      std::vector<float> logits;
      model->Eval(std::span<const int32_t>(prompt.data(),
                                           std::min<size_t>(prompt.size(), RwkvModel::kMaxChunk)),
                  s, &logits);
      const int32_t t = ArgMax(logits);
      model->Eval(std::span<const int32_t>(&t, 1), s, &logits);
    }
    std::vector<float> logits;
    logits.reserve(info.n_vocab);
    for (int r = 0; r < o->repeat; ++r) {
      State state = model->NewState();
      auto t0 = Clock::now();
      model->Eval(prompt, state, &logits);
      prompt_tps.push_back(prompt.size() / Seconds(t0, Clock::now()));
      if (o->gen_tokens > 0) {
        int32_t token = ArgMax(logits);
        t0 = Clock::now();
        for (int i = 0; i < o->gen_tokens; ++i) {
          model->Eval(std::span<const int32_t>(&token, 1), state, &logits);
          token = ArgMax(logits);
        }
        gen_tps.push_back(o->gen_tokens / Seconds(t0, Clock::now()));
      }
    }
    for (float f : logits) {
      if (!std::isfinite(f)) throw Error(path + ": the model produced non-finite logits");
    }
    // Batched decoding, each batch size's repeats one after the other.
    std::vector<std::vector<double>> batch_tps;
    for (int n : o->batch) {
      batch_tps.emplace_back();
      for (int r = 0; r < o->repeat; ++r) {
        batch_tps.back().push_back(BatchDecodeTokS(*model, n, o->gen_tokens));
      }
    }
    const uint64_t rss = PeakRssBytes();
    probe();
    const double load = Median(load_ms), pp = Median(prompt_tps), tg = Median(gen_tps);
    const double gflops_pp = 2.0 * ws.macs_per_token * pp / 1e9;
    const double bound = bandwidth > 0 ? bandwidth * 1e9 / ws.bytes_per_token : 0;
    if (o->json) {
      std::printf(
          "{\"model\": %s, \"arch\": \"%s\", \"layers\": %d, \"embd\": %d, \"vocab\": %d, "
          "\"type\": \"%s\", \"file_bytes\": %llu, \"weight_bytes_per_token\": %llu, "
          "\"macs_per_token\": %llu, \"threads\": %d, \"kernels\": \"%s\", "
          "\"target\": \"%s\", \"activations\": \"%s\", \"activations_f16\": \"%s\", "
          "\"repeat\": %d, \"load_mode\": \"%s\", \"load_ms\": %.3f, "
          "\"load_ms_all\": %s, \"prompt_tokens\": %d, \"prompt_tok_s\": %.3f, "
          "\"prompt_tok_s_all\": %s, \"prompt_gflop_s\": %.2f, \"gen_tokens\": %d, "
          "\"gen_tok_s\": %.3f, \"gen_tok_s_all\": %s, \"peak_rss_bytes\": %llu",
          JsonString(path).c_str(), std::string(ArchName(info.arch)).c_str(), info.n_layer,
          info.n_embd, info.n_vocab, info.main_type.c_str(),
          static_cast<unsigned long long>(info.file_size),
          static_cast<unsigned long long>(ws.bytes_per_token),
          static_cast<unsigned long long>(ws.macs_per_token), threads, kernels.c_str(),
          target.c_str(), activations.c_str(), activations_16.c_str(), o->repeat,
          info.load_mode.c_str(), load, JsonList(load_ms).c_str(), o->prompt_tokens, pp,
          JsonList(prompt_tps).c_str(), gflops_pp, o->gen_tokens, tg, JsonList(gen_tps).c_str(),
          static_cast<unsigned long long>(rss));
      if (!o->batch.empty()) {
        std::printf(", \"batch\": [");
        for (size_t i = 0; i < o->batch.size(); ++i) {
          std::printf("%s{\"sequences\": %d, \"tok_s\": %.3f, \"tok_s_all\": %s}", i ? ", " : "",
                      o->batch[i], Median(batch_tps[i]), JsonList(batch_tps[i]).c_str());
        }
        std::printf("]");
      }
      if (bandwidth > 0) {
        std::printf(
            ", \"read_bandwidth_gb_s\": %.2f, \"gen_bound_tok_s\": %.3f, "
            "\"gen_pct_of_bound\": %.1f",
            bandwidth, bound, 100.0 * tg / bound);
      }
      std::printf("}\n");
      return;
    }
    std::printf("model:       %s\n", path.c_str());
    std::printf("             RWKV %s, %d layers x %d, vocab %d, %s, %.1f MiB\n",
                std::string(ArchName(info.arch)).c_str(), info.n_layer, info.n_embd, info.n_vocab,
                info.main_type.c_str(), info.file_size / 1048576.0);
    std::printf(
        "kernels:     %s (%s), %d thread%s, %s activations for quantized matrices, %s for "
        "F16/BF16\n",
        kernels.c_str(), target.c_str(), threads, threads == 1 ? "" : "s", activations.c_str(),
        activations_16.c_str());
    // The first load can differ most (fresh memory, cold page cache), so it is shown too.
    std::printf("load:        %.2f ms (median of %d, first %.2f ms; %s)\n", load, o->repeat,
                load_ms.front(),
                info.load_mode == "read" ? "read into huge pages" : "memory-mapped");
    std::printf("prompt:      %.2f tok/s (%d tokens, median of %d; %.1f GFLOP/s)\n", pp,
                o->prompt_tokens, o->repeat, gflops_pp);
    if (o->gen_tokens > 0) {
      std::printf("generation:  %.2f tok/s (%d tokens, median of %d; %.1f MiB of weights/token)\n",
                  tg, o->gen_tokens, o->repeat, ws.bytes_per_token / 1048576.0);
    }
    if (!o->batch.empty()) {
      std::printf(
          "batched:     N sequences decoding together, one token each per step (%d "
          "steps, median of %d); aggregate tok/s, and x generation above\n",
          o->gen_tokens, o->repeat);
      for (size_t i = 0; i < o->batch.size(); ++i) {
        const double tps = Median(batch_tps[i]);
        std::printf("  N = %-4d   %10.2f tok/s  (%.2f per sequence, %.2fx)\n", o->batch[i], tps,
                    tps / o->batch[i], tg > 0 ? tps / tg : 0.0);
      }
    }
    if (bandwidth > 0) {
      std::printf("bandwidth:   %.2f GB/s read -> bound %.2f tok/s; generation at %.0f%%\n",
                  bandwidth, bound, 100.0 * tg / bound);
    }
    std::printf("peak RSS:    %.1f MiB (file %.1f MiB)\n", rss / 1048576.0,
                info.file_size / 1048576.0);
  });
}

}  // namespace aviary::cli
