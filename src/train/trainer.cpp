#include "train/trainer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <span>
#include <sstream>

#include "aviary/error.h"
#include "formats/json_number.h"
#include "tensor/aligned.h"
#include "tensor/thread_pool.h"
#include "tokenizers/tokenizers.h"
#include "train/checkpoint.h"
#include "train/chunked.h"
#include "train/comm.h"
#include "train/dataset.h"
#include "train/export.h"
#include "train/import.h"
#include "train/init.h"
#include "train/optimizer.h"
#include "train/rwkv7_graph.h"

namespace aviary::train {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

nlohmann::json OptionsJson(const TrainOptions& o) {
  return {{"data", o.data},
          {"tokenizer", o.tokenizer},
          {"init", o.init_model},
          {"layers", o.layers},
          {"embd", o.embd},
          {"ctx_len", o.ctx_len},
          {"chunk_len", o.chunk_len},
          {"grad_chunks", o.grad_chunks},
          {"batch", o.batch},
          {"steps", o.steps},
          {"lr", o.lr},
          {"lr_final", o.lr_final},
          {"warmup", o.warmup},
          {"weight_decay", o.weight_decay},
          {"grad_clip", o.grad_clip},
          {"seed", o.seed},
          {"val_fraction", o.val_fraction},
          {"eval_every", o.eval_every},
          {"eval_windows", o.eval_windows},
          {"save_every", o.save_every},
          {"pth_type", o.pth_type},
          {"tune", o.tune},
          {"lora_rank", o.lora_rank},
          {"lora_alpha", o.lora_alpha},
          {"lora_targets", o.lora_targets}};
}

}  // namespace

TrainOptions OptionsFromJson(const nlohmann::json& j, const std::string& dir) {
  auto fail = [&](const std::string& what) -> void {
    throw Error(dir + ": the checkpoint's options are incomplete (" + what + ")");
  };
  // Counts go through JsonInteger: a float or out-of-range number is refused, never cast.
  // A count in 0..hi; an optional one that is absent reads as 0.
  auto integer = [&](const char* key, bool required, int64_t hi) -> int64_t {
    const auto it = j.find(key);
    if (it == j.end()) {
      if (required) fail(std::string("no \"") + key + "\"");
      return 0;
    }
    const std::optional<int64_t> v = JsonInteger(*it, 0, hi);
    if (!v) fail(std::string("\"") + key + "\" is not a count");
    return *v;
  };
  constexpr int64_t kInt = std::numeric_limits<int>::max();
  constexpr int64_t kLong = std::numeric_limits<int64_t>::max();
  try {
    TrainOptions o;
    o.data = j.at("data").get<std::vector<std::string>>();
    o.tokenizer = j.at("tokenizer").get<std::string>();
    o.init_model = j.at("init").get<std::string>();
    o.layers = static_cast<int>(integer("layers", true, kInt));
    o.embd = static_cast<int>(integer("embd", true, kInt));
    o.ctx_len = static_cast<int>(integer("ctx_len", true, kInt));
    // chunk_len and grad_chunks are absent in runs from before chunked windows.
    o.chunk_len = static_cast<int>(integer("chunk_len", false, kInt));
    o.grad_chunks = static_cast<int>(integer("grad_chunks", false, kInt));
    o.batch = static_cast<int>(integer("batch", true, kInt));
    o.steps = integer("steps", true, kLong);
    o.lr = j.at("lr").get<double>();
    o.lr_final = j.at("lr_final").get<double>();
    o.warmup = integer("warmup", true, kLong);
    o.weight_decay = j.at("weight_decay").get<double>();
    o.grad_clip = j.at("grad_clip").get<double>();
    const auto seed = j.find("seed");
    const std::optional<uint64_t> seed_value =
        seed == j.end() ? std::nullopt : JsonUnsigned(*seed);
    if (!seed_value) fail("\"seed\" is not a non-negative integer");
    o.seed = *seed_value;
    o.val_fraction = j.at("val_fraction").get<double>();
    o.eval_every = integer("eval_every", true, kLong);
    o.eval_windows = static_cast<int>(integer("eval_windows", true, kInt));
    o.save_every = integer("save_every", true, kLong);
    o.pth_type = j.at("pth_type").get<std::string>();
    o.tune = j.value("tune", std::string("full"));  // absent in runs from before LoRA
    o.lora_rank = static_cast<int>(integer("lora_rank", false, kInt));
    o.lora_alpha = j.value("lora_alpha", 0.0);
    o.lora_targets = j.value("lora_targets", std::vector<std::string>{});
    o.out_dir = dir;
    return o;
  } catch (const nlohmann::json::exception& e) {
    throw Error(dir + ": the checkpoint's options are incomplete (" + e.what() + ")");
  }
}

namespace {

// Tokens per forward pass: a window is cut into chunks of this many.
int ChunkLen(const TrainOptions& o) { return o.chunk_len > 0 ? o.chunk_len : o.ctx_len; }

void ValidateOptions(const TrainOptions& o) {
  auto fail = [](const std::string& s) { throw UsageError(s); };
  if (o.ctx_len < 1 || o.ctx_len > 1 << 20) fail("--ctx-len must be 1..1048576");
  if (o.chunk_len < 0 || o.chunk_len > o.ctx_len) fail("--chunk-len must be 0..--ctx-len");
  if (o.grad_chunks < 0) fail("--grad-chunks must be >= 0");
  if (o.batch < 1 || o.batch > 65536) fail("--batch must be 1..65536");
  if (static_cast<int64_t>(o.batch) * ChunkLen(o) > (int64_t{1} << 24)) {
    fail("--batch x --chunk-len (or --ctx-len) must be at most 16777216 tokens per pass");
  }
  if (o.steps < 1) fail("--steps must be at least 1");
  if (!(o.lr > 0) || !std::isfinite(o.lr) || o.lr > 1) fail("--lr must be in (0, 1]");
  if (!(o.lr_final >= 0) || o.lr_final > 1) fail("--lr-final must be in [0, 1]");
  if (o.warmup < 0) fail("--warmup must be >= 0");
  if (!(o.weight_decay >= 0) || o.weight_decay > 10) fail("--weight-decay must be in [0, 10]");
  if (!(o.grad_clip >= 0) || !std::isfinite(o.grad_clip)) fail("--grad-clip must be >= 0");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1)) fail("--val-fraction must be in [0, 1)");
  if (o.eval_every < 0) fail("--eval-every must be >= 0");
  if (o.eval_windows < 1) fail("--eval-windows must be >= 1");
  if (o.save_every < 0) fail("--save-every must be >= 0");
  if (o.pth_type != "f32" && o.pth_type != "bf16") fail("--pth-type must be f32 or bf16");
  if (o.data.empty()) fail("--data: give at least one file");
  if (o.tune != "full" && o.tune != "lora" && o.tune != "state") {
    fail("--tune must be full, lora or state, not '" + o.tune + "'");
  }
  if (o.tune != "full" && o.init_model.empty()) {
    fail("--tune " + o.tune + " tunes an existing model: give --init MODEL");
  }
  if (o.tune != "lora" && (o.lora_rank != 0 || !o.lora_targets.empty() || o.lora_alpha != 0)) {
    fail("--lora-rank, --lora-alpha and --lora-targets are for --tune lora, not --tune " + o.tune);
  }
  if (o.tune == "lora") {
    if (o.lora_rank < 1 || o.lora_rank > 4096) fail("--lora-rank must be 1..4096");
    for (const std::string& t : o.lora_targets) {
      if (!IsRwkv7MatrixName(t)) {
        fail("--lora-targets: unknown matrix '" + t +
             "' (valid: att.receptance, att.key, att.value, att.output, ffn.key, ffn.value)");
      }
    }
    if (!(o.lora_alpha >= 0) || !std::isfinite(o.lora_alpha) || o.lora_alpha > 1e6) {
      fail("--lora-alpha must be > 0 (0: the rank)");
    }
  }
  if (o.out_dir.empty()) fail("--out DIR is required");
}

std::string Describe(const Rwkv7Config& c) {
  return "RWKV-7, " + std::to_string(c.n_layer) + " layers x " + std::to_string(c.n_embd) +
         ", head size " + std::to_string(c.head_size) + ", vocabulary " + std::to_string(c.vocab);
}

// The process's resident memory now, in MiB (0 where /proc is missing).
double ResidentMiB() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / 1048576.0;
}

// Runs fn(begin, end) over the floats of a flat buffer in fixed blocks.
template <typename F>
void ForBlocks(size_t n, F&& fn) {
  ParallelForRanges(static_cast<int64_t>(n), int64_t{1} << 16, [&](int64_t b, int64_t e) {
    fn(static_cast<size_t>(b), static_cast<size_t>(e));
  });
}

}  // namespace

// The adapters' scale: alpha / rank, alpha defaulting to the rank (PEFT's and RWKV-PEFT's usual
// r = alpha, so the learning rate means the same at any rank).
float LoraScale(const TrainOptions& o) {
  return o.lora_rank > 0
             ? static_cast<float>((o.lora_alpha > 0 ? o.lora_alpha : o.lora_rank) / o.lora_rank)
             : 0.0f;
}

std::vector<std::string> LoraTargets(const TrainOptions& o) {
  if (!o.lora_targets.empty()) return o.lora_targets;
  return {std::begin(kRwkv7MatrixNames), std::end(kRwkv7MatrixNames)};
}

// PEFT's (and RWKV-PEFT's) initialisation: A kaiming-uniform with a = sqrt(5), which is
// U(-1/sqrt(in), 1/sqrt(in)), B zero, so the adapted model starts as the base exactly.
void InitLora(const ParamLayout& layout, uint64_t seed, float* params) {
  std::mt19937_64 rng(seed ^ 0x6c6f7261ull);  // "lora": not the window order's stream
  for (const ParamEntry& e : layout.entries()) {
    float* p = params + e.offset;
    if (e.name.ends_with(".lora_B")) {
      std::fill_n(p, e.size, 0.0f);
      continue;
    }
    const float bound = 1.0f / std::sqrt(static_cast<float>(e.shape.at(1)));
    std::uniform_real_distribution<float> u(-bound, bound);
    for (size_t i = 0; i < e.size; ++i) p[i] = u(rng);
  }
}

struct Trainer::Impl {
  TrainOptions o;
  Runtime& runtime;
  TrainingTokenizer tok;
  ParamLayout layout;
  AlignedVector<float> params, grads, adam_m, adam_v;
  std::unique_ptr<TokenDataset> data;
  DataSplit split;
  std::unique_ptr<WindowSampler> sampler;
  std::unique_ptr<ValidationWindows> validation;
  std::unique_ptr<const FrozenRwkv7> frozen;  // lora, state: the base, as stored
  std::unique_ptr<Rwkv7Graph> graph;
  std::unique_ptr<ChunkedWindows> chunks;  // runs windows on `graph` chunk by chunk
  std::unique_ptr<AdamW> adamw;
  int64_t step = 0;
  RunSummary summary;
  std::ofstream log;
  double train_seconds = 0;  // time in training steps (not validation, not saving)

  // The run's processes (one without MPI). Every rank holds the same weights and draws the same
  // windows; rank r computes its share of each batch and the gradients are summed over ranks.
  Comm& comm;
  std::vector<uint64_t> checksums;  // each rank's weights' checksum at the last check

  Impl(TrainOptions options, Runtime& rt) : o(std::move(options)), runtime(rt), comm(WorldComm()) {}

  // This rank's share of `count` windows, [count r / N, count (r + 1) / N): shares differ by
  // at most one window and cover the batch in rank order.
  std::pair<int, int> Share(int count) const {
    const int64_t N = comm.size(), r = comm.rank();
    return {static_cast<int>(count * r / N), static_cast<int>(count * (r + 1) / N)};
  }
  // The most windows a rank computes at once: its graph is sized for this many.
  int MaxShare() const { return (o.batch + comm.size() - 1) / comm.size(); }
  bool Leader() const { return comm.rank() == 0; }
  void CheckProcesses() const {
    if (o.batch < comm.size()) {
      throw UsageError("--batch " + std::to_string(o.batch) + " is smaller than the " +
                       std::to_string(comm.size()) +
                       " processes: each needs at least one window per step");
    }
  }

  // Fails on every rank unless all ranks hold bit-identical weights (kept in `checksums`).
  void CheckRanksAgree(const std::string& when) {
    if (comm.size() == 1) return;
    checksums = comm.AllGather(FloatsChecksum(params.data(), params.size()));
    for (uint64_t c : checksums) {
      if (c != checksums[0]) {
        throw Error("the processes' weights differ " + when +
                    " (the gradient sum was not the same on every rank, or the ranks started "
                    "from different files): the checkpoint holds the last weights they agreed on");
      }
    }
  }

  void MakeGraph() {
    if (!frozen) {
      graph = std::make_unique<Rwkv7Graph>(layout, MaxShare(), ChunkLen(o));
    } else {
      graph = std::make_unique<Rwkv7Graph>(*frozen, o.tune == "lora" ? &layout : nullptr,
                                           LoraScale(o), MaxShare(), ChunkLen(o));
    }
  }

  // State tuning: the tuned state (params, Rwkv7State's layout) as the start state of n
  // sequences in the graph's (n, StateFloats()) layout; the token-shift parts stay zero.
  std::vector<float> batch_state, d_batch_state;
  const float* StartState(int n) {
    if (o.tune != "state") return nullptr;
    const size_t SF = graph->StateFloats();
    batch_state.assign(static_cast<size_t>(n) * SF, 0.0f);
    for (int b = 0; b < n; ++b) TunedStateToSequence(layout, params.data(), &batch_state[b * SF]);
    return batch_state.data();
  }

  uint64_t data_tokens = 0, data_documents = 0;

  void OpenData() {
    // Rank 0 tokenizes text into DIR/data; the others wait, then open what it wrote (on several
    // hosts, DIR must be on a shared file system, or --data a binidx dataset on every host).
    PreparedData prepared;
    if (Leader()) prepared = PrepareDataset(o.data, *tok.tokenizer, o.out_dir);
    uint64_t length = prepared.prefix.size();
    comm.Broadcast(&length, sizeof length, 0);  // also the barrier: rank 0 has written the data
    prepared.prefix.resize(length);
    comm.Broadcast(prepared.prefix.data(), length, 0);
    if (!Leader()) prepared = OpenPreparedData(prepared.prefix);
    const std::vector<uint64_t> tokens = comm.AllGather(prepared.tokens);
    for (uint64_t t : tokens) {
      if (t != tokens[0]) {
        throw Error("the processes see different training data (" + std::to_string(tokens[0]) +
                    " tokens on rank 0, " + std::to_string(t) +
                    " on another): give every host the same --data files");
      }
    }
    data_tokens = prepared.tokens;
    data_documents = prepared.documents;
    data = std::make_unique<TokenDataset>(prepared.prefix);
    split = SplitTokens(data->size(), o.val_fraction);
    const int32_t V = layout.config().vocab;
    sampler = std::make_unique<WindowSampler>(*data, split.train, o.ctx_len, o.seed, V);
    if (split.validation.size() > 0) {
      validation = std::make_unique<ValidationWindows>(*data, split.validation, o.ctx_len,
                                                       o.eval_windows, V);
    }
  }

  // The dataset rank 0 prepared, as a rank that writes nothing to the run directory sees it.
  PreparedData OpenPreparedData(const std::string& prefix) const {
    if (!fs::exists(prefix + ".bin") || !fs::exists(prefix + ".idx")) {
      throw Error("rank " + std::to_string(comm.rank()) + " on host " + comm.host() +
                  " cannot see " + prefix +
                  ".{bin,idx}, which rank 0 reads: a run on several hosts needs --out on a "
                  "shared file system, or --data as a binidx dataset present on every host");
    }
    const TokenDataset d(prefix);
    return {prefix, true, d.size(), d.header().documents};
  }

  void Prepare() {
    const Rwkv7Config& c = layout.config();
    if (tok.tokenizer->vocab_size() > c.vocab) {
      throw Error("the tokenizer has " + std::to_string(tok.tokenizer->vocab_size()) +
                  " tokens but the model's vocabulary is " + std::to_string(c.vocab));
    }
    const size_t n = layout.total_floats();
    grads.assign(n, 0.0f);
    if (adam_m.size() != n) adam_m.assign(n, 0.0f);
    if (adam_v.size() != n) adam_v.assign(n, 0.0f);
    AdamWOptions a;
    a.lr_init = static_cast<float>(o.lr);
    a.lr_final = static_cast<float>(o.lr_final);
    a.warmup_steps = o.warmup;
    a.total_steps = o.steps;
    a.weight_decay = static_cast<float>(o.weight_decay);
    a.grad_clip = static_cast<float>(o.grad_clip);
    adamw = std::make_unique<AdamW>(layout, a);
    if (!graph) MakeGraph();
    chunks = std::make_unique<ChunkedWindows>(*graph, ChunkLen(o), o.grad_chunks);
    summary.model = Describe(c);
    int64_t count = 0;
    for (const ParamEntry& e : layout.entries()) count += static_cast<int64_t>(e.size);
    summary.parameters = count;
    summary.tune = o.tune;
    if (frozen) summary.frozen_bytes = frozen->StoredBytes() + frozen->small.size() * sizeof(float);
    summary.train_tokens = split.train.size();
    summary.validation_tokens = split.validation.size();
    summary.weight_bytes = summary.gradient_bytes = n * sizeof(float);
    summary.adam_bytes = 2 * n * sizeof(float);
    summary.activation_bytes = graph->ActivationBytes();
    const int chunk_count = (o.ctx_len + ChunkLen(o) - 1) / ChunkLen(o);
    if (chunk_count > 1) {
      summary.chunk_state_bytes =
          static_cast<size_t>(chunk_count) * MaxShare() * graph->StateFloats() * sizeof(float);
    }
    summary.start_step = step;
    summary.batch = o.batch;
  }

  void OpenLog(bool resumed) {
    if (!Leader()) return;  // rank 0 alone writes to the run directory
    const std::string path = o.out_dir + "/log.jsonl";
    if (resumed) {
      // Drop the lines of steps after the checkpoint: the resumed run writes them again.
      std::ifstream in(path);
      std::string line, kept;
      while (std::getline(in, line)) {
        try {
          const std::optional<int64_t> logged = JsonInteger(
              nlohmann::json::parse(line).at("step"), 0, std::numeric_limits<int64_t>::max());
          if (!logged) break;  // a damaged line
          if (*logged <= step) kept += line + "\n";
        } catch (const nlohmann::json::exception&) {
          break;  // a line cut short by the kill that ended the run
        }
      }
      std::ofstream out(path, std::ios::trunc);
      out << kept;
    }
    log.open(path, std::ios::app);
    if (!log) throw Error(path + ": cannot write the training log");
  }

  void Save() {
    if (!Leader()) return;
    CheckpointMeta meta;
    meta.options = OptionsJson(o);
    meta.step = step;
    meta.extra = {{"data_tokens", data_tokens}, {"data_documents", data_documents}};
    if (frozen) {  // a resume refuses a base that changed
      meta.extra["base_fingerprint"] = frozen->fingerprint;
      meta.extra["base_bytes"] = frozen->file_size;
    }
    meta.sampler_state = std::to_string(sampler->State());
    SaveCheckpoint(o.out_dir + "/checkpoint", layout, params.data(), adam_m.data(), adam_v.data(),
                   meta);
  }
};

Trainer::Trainer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Trainer::~Trainer() = default;

const RunSummary& Trainer::summary() const { return impl_->summary; }

std::unique_ptr<Trainer> Trainer::Start(const TrainOptions& options,
                                        const TokenizerResolver& tokenizers, Runtime& runtime) {
  ValidateOptions(options);
  auto impl = std::make_unique<Impl>(options, runtime);
  TrainOptions& o = impl->o;
  impl->CheckProcesses();
  if (fs::exists(o.out_dir + "/checkpoint") || fs::exists(o.out_dir + "/log.jsonl")) {
    throw UsageError(o.out_dir + " already holds a training run: continue it with --resume " +
                     o.out_dir + " or choose another --out");
  }
  impl->comm.Barrier();  // every rank has looked before rank 0 writes anything
  if (impl->Leader()) fs::create_directories(o.out_dir);
  ScopedRuntime scope(&runtime);
  if (o.tune != "full") {
    if (o.layers || o.embd) throw UsageError("--init takes the model's size: drop --layers/--embd");
    impl->frozen = LoadFrozenRwkv7(o.init_model);
    const Rwkv7Config& c = impl->frozen->config();
    if (o.tune == "lora") {
      impl->layout = ParamLayout::Rwkv7Lora(c, o.lora_rank, LoraTargets(o));
      impl->params.assign(impl->layout.total_floats(), 0.0f);
      InitLora(impl->layout, o.seed, impl->params.data());
    } else {
      impl->layout = ParamLayout::Rwkv7State(c);
      impl->params.assign(impl->layout.total_floats(), 0.0f);  // the base's own start: zeros
    }
    impl->tok = tokenizers(o.tokenizer, c.vocab);
  } else if (!o.init_model.empty()) {
    if (o.layers || o.embd) throw UsageError("--init takes the model's size: drop --layers/--embd");
    ImportedRwkv7 imported = LoadRwkv7Params(o.init_model);
    impl->layout = std::move(imported.layout);
    impl->params = std::move(imported.params);
    impl->tok = tokenizers(o.tokenizer, impl->layout.config().vocab);
  } else {
    impl->tok = tokenizers(o.tokenizer, 0);
    if (o.layers < 1 || o.embd < 1) {
      throw UsageError(
          "give --init MODEL to finetune, or --layers and --embd to start from "
          "scratch");
    }
    impl->layout = ParamLayout::Rwkv7(
        Rwkv7Config::Official(o.layers, o.embd, impl->tok.tokenizer->vocab_size()));
    // Weights, gradients and two Adam moments: 16 bytes a parameter, before any is allocated.
    const double bytes = 16.0 * static_cast<double>(impl->layout.total_floats());
    const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
    if (memory > 0 && bytes > memory) {
      char what[160];
      std::snprintf(what, sizeof what,
                    "%d layers x %d need %.1f GiB for weights, gradients and Adam moments, more "
                    "than this machine's %.1f GiB",
                    o.layers, o.embd, bytes / (1 << 30), memory / (1 << 30));
      throw Error(what);
    }
    impl->params.assign(impl->layout.total_floats(), 0.0f);
    InitRwkv7(impl->layout, o.seed, impl->params.data());
  }
  o.tokenizer = impl->tok.spec;
  // The activations are allocated before the data is read, so that a batch too large for the
  // machine is refused before a long tokenization.
  impl->MakeGraph();
  impl->OpenData();
  impl->Prepare();
  impl->CheckRanksAgree("at the start");
  impl->OpenLog(false);
  return std::unique_ptr<Trainer>(new Trainer(std::move(impl)));
}

std::unique_ptr<Trainer> Trainer::Resume(const std::string& dir, int64_t steps,
                                         const TokenizerResolver& tokenizers, Runtime& runtime) {
  Checkpoint ck = LoadCheckpoint(dir + "/checkpoint");
  TrainOptions options = OptionsFromJson(ck.meta.options, dir);
  if (steps > 0) options.steps = steps;
  ValidateOptions(options);
  if (ck.meta.step > options.steps) {
    throw UsageError(dir + " is at step " + std::to_string(ck.meta.step) + ", past --steps " +
                     std::to_string(options.steps));
  }
  auto impl = std::make_unique<Impl>(options, runtime);
  impl->CheckProcesses();
  ScopedRuntime scope(&runtime);
  impl->layout = std::move(ck.layout);
  impl->tok = tokenizers(options.tokenizer, impl->layout.config().vocab);
  impl->params = std::move(ck.params);
  impl->adam_m = std::move(ck.adam_m);
  impl->adam_v = std::move(ck.adam_v);
  impl->step = ck.meta.step;
  // What the run recorded about its inputs; a field missing or not a count reads as 0 and so
  // fails the comparison with what is there now.
  auto recorded = [&](const char* key) -> uint64_t {
    const auto it = ck.meta.extra.find(key);
    return it == ck.meta.extra.end() ? 0 : JsonUnsigned(*it).value_or(0);
  };
  // The activations are allocated before the data is read, so that a batch too large for the
  // machine is refused before a long tokenization.
  if (options.tune != "full") {
    impl->frozen = LoadFrozenRwkv7(options.init_model);
    if (recorded("base_fingerprint") != impl->frozen->fingerprint ||
        recorded("base_bytes") != impl->frozen->file_size) {
      throw Error(dir + ": the base model " + options.init_model +
                  " changed since the run started: its adapters or state belong to the old one");
    }
  }
  impl->MakeGraph();
  impl->OpenData();
  if (recorded("data_tokens") != impl->data_tokens ||
      recorded("data_documents") != impl->data_documents) {
    throw Error(dir + ": the training data changed since the run started (" +
                std::to_string(impl->data_tokens) + " tokens now, " +
                std::to_string(recorded("data_tokens")) +
                " then): start a new run");
  }
  try {
    impl->sampler->Restore(std::stoull(ck.meta.sampler_state));
  } catch (const std::exception&) {
    throw Error(dir + "/checkpoint: the data sampler's position is not a number");
  }
  impl->Prepare();
  impl->CheckRanksAgree("at the start");
  impl->summary.resumed = true;
  impl->OpenLog(true);
  return std::unique_ptr<Trainer>(new Trainer(std::move(impl)));
}

double Trainer::ValidationLoss() {
  Impl& r = *impl_;
  if (!r.validation || r.validation->count() == 0) return -1;
  if (!r.graph) throw Error("internal: the run has ended");
  ScopedRuntime scope(&r.runtime);
  const int B = r.o.batch, T = r.o.ctx_len;
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  double sum = 0;
  int64_t tokens = 0;
  // Each rank scores its share of every batch of B windows; the sums are added over ranks.
  for (int first = 0; first < r.validation->count(); first += B) {
    const int batch = std::min(B, r.validation->count() - first);
    const auto [b0, b1] = r.Share(batch);
    if (b1 == b0) continue;
    const int n = r.validation->Fill(first + b0, b1 - b0, in.data(), tg.data());
    const size_t used = static_cast<size_t>(n) * T;
    const LossSum loss = r.chunks->Loss(r.params.data(), std::span(in).first(used),
                                        std::span(tg).first(used), n, T, r.StartState(n));
    sum += loss.sum;
    tokens += loss.tokens;
  }
  double total[2] = {sum, static_cast<double>(tokens)};
  r.comm.AllReduceSum(total, 2);
  return total[0] / total[1];
}

bool Trainer::Run(const std::function<void(const StepReport&)>& on_step,
                  const std::function<bool()>& stop) {
  Impl& r = *impl_;
  if (!r.graph) throw Error("internal: the run has ended");
  ScopedRuntime scope(&r.runtime);
  const int B = r.o.batch, T = r.o.ctx_len;
  const size_t n = r.layout.total_floats();
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  const int N = r.comm.size();
  const auto [b0, b1] = r.Share(B);  // this rank's windows of each step's batch
  const std::span<const int32_t> my_in = std::span(in).subspan(static_cast<size_t>(b0) * T,
                                                              static_cast<size_t>(b1 - b0) * T);
  const std::span<const int32_t> my_tg = std::span(tg).subspan(static_cast<size_t>(b0) * T,
                                                              static_cast<size_t>(b1 - b0) * T);
  // Under MPI the gradients' buckets are summed over ranks while the backward pass computes the
  // layers below them.
  std::function<void(size_t, size_t)> grads_ready;
  if (N > 1) grads_ready = [&r](size_t b, size_t e) { r.comm.Ready(b, e); };
  auto write_log = [&](const nlohmann::json& j) {
    if (!r.Leader()) return;
    r.log << j.dump() << "\n";
    r.log.flush();
    if (!r.log) throw Error(r.o.out_dir + "/log.jsonl: write failed (disk full?)");
  };
  if (r.step == 0 && r.validation) {
    StepReport report;
    report.steps = r.o.steps;
    report.val_loss = ValidationLoss();
    report.lr = LearningRate(0, r.adamw->options());
    write_log({{"step", 0}, {"val_loss", report.val_loss}});
    if (on_step) on_step(report);
  }
  const auto run_start = Clock::now();
  const int64_t first_step = r.step;
  while (r.step < r.o.steps) {
    r.comm.TakeSeconds();
    const auto t0 = Clock::now();
    // Every rank draws the same B windows (the sampler is global) and computes its share; the
    // loss scale is the whole batch's, so the sum over ranks is the one-process gradient.
    r.sampler->Next(B, in.data(), tg.data());
    ForBlocks(n, [&](size_t b, size_t e) { std::fill(&r.grads[b], &r.grads[0] + e, 0.0f); });
    r.comm.Begin(r.grads.data(), n);
    LossSum loss;
    if (r.o.tune == "state") {
      // One start state for every window: its gradient is the sum over the windows' own.
      const int mine = b1 - b0;
      const float* start = r.StartState(mine);
      r.d_batch_state.assign(r.batch_state.size(), 0.0f);
      loss = r.chunks->Gradients(nullptr, nullptr, my_in, my_tg, mine, T,
                                 1.0f / (static_cast<float>(B) * T), start,
                                 r.d_batch_state.data());
      const size_t SF = r.graph->StateFloats();
      for (int b = 0; b < mine; ++b) {
        AddSequenceStateGradient(r.layout, &r.d_batch_state[b * SF], r.grads.data());
      }
      if (grads_ready) grads_ready(0, n);
    } else {
      loss = r.chunks->Gradients(r.params.data(), r.grads.data(), my_in, my_tg, b1 - b0, T,
                                 1.0f / (static_cast<float>(B) * T), nullptr, nullptr,
                                 grads_ready);
    }
    bool stopping = false;
    if (N > 1) {
      r.comm.Finish();
      // The batch's loss, and whether any rank was asked to stop: all stop at the same step.
      double sums[3] = {loss.sum, static_cast<double>(loss.tokens), stop && stop() ? 1.0 : 0.0};
      r.comm.AllReduceSum(sums, 3);
      loss.sum = sums[0];
      loss.tokens = static_cast<int64_t>(sums[1]);
      stopping = sums[2] > 0;
    }
    const double norm = r.adamw->ClipGradients(r.grads.data());
    const double lr = LearningRate(r.step, r.adamw->options());
    r.adamw->Step(r.step, r.params.data(), r.grads.data(), r.adam_m.data(), r.adam_v.data());
    ++r.step;
    r.train_seconds += std::chrono::duration<double>(Clock::now() - t0).count();

    StepReport report;
    report.step = r.step;
    report.steps = r.o.steps;
    report.loss = loss.sum / static_cast<double>(loss.tokens);
    if (!std::isfinite(report.loss)) {
      throw Error("the loss is not finite at step " + std::to_string(r.step) +
                  ": lower --lr (the checkpoint holds the last good weights)");
    }
    report.lr = lr;
    report.grad_norm = norm;
    report.tokens_per_second =
        static_cast<double>(r.step - first_step) * B * T / std::max(r.train_seconds, 1e-9);
    nlohmann::json line = {{"step", r.step},
                           {"loss", report.loss},
                           {"lr", lr},
                           {"grad_norm", norm},
                           {"tokens", r.step * static_cast<int64_t>(B) * T},
                           {"tokens_per_s", report.tokens_per_second}};
    if (N > 1) {
      line["ranks"] = N;
      line["comm_s"] = r.comm.TakeSeconds();
    }
    const bool last = r.step == r.o.steps;
    if (r.validation && ((r.o.eval_every > 0 && r.step % r.o.eval_every == 0) || last)) {
      report.val_loss = ValidationLoss();
      line["val_loss"] = report.val_loss;
    }
    report.elapsed_seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
    line["elapsed_s"] = report.elapsed_seconds;
    line["rss_mib"] = ResidentMiB();
    const double per_step = report.elapsed_seconds / static_cast<double>(r.step - first_step);
    report.eta_seconds = per_step * static_cast<double>(r.o.steps - r.step);
    const bool saved = (r.o.save_every > 0 && r.step % r.o.save_every == 0) || last;
    stopping = stopping && !last;
    if (N > 1 && (saved || stopping)) {
      r.CheckRanksAgree("after step " + std::to_string(r.step));
      nlohmann::json sums = nlohmann::json::array();
      for (uint64_t c : r.checksums) {
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(c));
        sums.push_back(hex);
      }
      line["weights_checksums"] = sums;
    }
    write_log(line);
    if (saved) r.Save();
    if (on_step) on_step(report);
    if (N == 1) stopping = !last && stop && stop();
    if (stopping) {
      if (!saved) r.Save();
      return false;
    }
  }
  // The checkpoint holds the gradients' and moments' part of the run: free them and the
  // activations, so the exports' temporary copies fit in the memory the steps used.
  r.chunks.reset();
  r.graph.reset();
  for (AlignedVector<float>* buffer : {&r.grads, &r.adam_m, &r.adam_v})
    AlignedVector<float>().swap(*buffer);
  if (r.Leader()) {
    if (r.o.tune == "lora") {
      ExportLoraAdapter(r.o.out_dir + "/adapter.pth", r.layout, r.params.data(),
                        LoraScale(r.o) * r.o.lora_rank, r.o.init_model, r.frozen->fingerprint);
    } else if (r.o.tune == "state") {
      ExportTunedState(r.o.out_dir, r.layout, r.params.data(), r.o.init_model);
    } else {
      const std::string pth = r.o.out_dir + "/model.pth";
      ExportRwkv7Pth(pth, r.layout, r.params.data(),
                     r.o.pth_type == "bf16" ? DType::kBF16 : DType::kF32);
      ExportRwkv7Gguf(r.o.out_dir + "/model.gguf", pth, r.tok.data);
    }
  }
  r.comm.Barrier();  // the run ends on every rank once its files are written
  return true;
}

TrainingTokenizer LoadTrainingTokenizer(const std::string& spec) {
  TrainingTokenizer t;
  t.spec = spec;
  if (spec == "bytes") {
    t.tokenizer = MakeByteTokenizer();
    return t;
  }
  auto data = std::make_shared<TokenizerData>(spec.ends_with(".json") ? ReadTokenizerJson(spec)
                                                                      : ReadWorldVocab(spec));
  t.tokenizer = MakeTokenizer(*data);
  t.data = std::move(data);
  return t;
}

// ---- the loss plot ----

void PlotLoss(const std::string& log_path, const std::string& png) {
  std::ifstream in(log_path);
  if (!in) throw Error(log_path + ": cannot read the training log");
  std::vector<std::pair<int64_t, double>> train, val;
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step")) {
      throw Error(log_path + ":" + std::to_string(line_no) + ": not a training log line");
    }
    const std::optional<int64_t> step =
        JsonInteger(j["step"], 0, std::numeric_limits<int64_t>::max());
    const auto number = [&](const char* key) { return j.contains(key) && j[key].is_number(); };
    if (!step || (j.contains("loss") && !number("loss")) ||
        (j.contains("val_loss") && !number("val_loss"))) {
      throw Error(log_path + ":" + std::to_string(line_no) + ": a step or loss is not a number");
    }
    if (j.contains("loss")) train.emplace_back(*step, j["loss"].get<double>());
    if (j.contains("val_loss")) val.emplace_back(*step, j["val_loss"].get<double>());
  }
  if (train.empty() && val.empty()) throw Error(log_path + ": no losses to plot");
  std::string gnuplot;
  for (const char* dir : {"/usr/bin", "/usr/local/bin", "/bin"}) {
    const std::string p = std::string(dir) + "/gnuplot";
    if (access(p.c_str(), X_OK) == 0) gnuplot = p;
    if (!gnuplot.empty()) break;
  }
  if (gnuplot.empty()) {
    throw Error("plotting needs gnuplot (Debian: apt-get install gnuplot-nox)");
  }
  // gnuplot reads its data and writes its picture in a private folder, so no user path ever
  // appears in its script; the picture is then moved into place.
  char tmpl[] = "/tmp/aviary-plot-XXXXXX";
  if (!mkdtemp(tmpl)) throw Error("cannot create a temporary folder for the plot");
  const std::string tmp = tmpl;
  {
    std::ofstream t(tmp + "/train.dat"), v(tmp + "/val.dat");
    // A centred moving mean over 5% of the run (at least 1 step) shows the trend under the
    // noise of single batches without lagging behind it.
    const size_t half = train.size() / 40;
    std::vector<double> prefix(train.size() + 1, 0.0);
    for (size_t i = 0; i < train.size(); ++i) prefix[i + 1] = prefix[i] + train[i].second;
    for (size_t i = 0; i < train.size(); ++i) {
      const size_t b = i >= half ? i - half : 0, e = std::min(train.size(), i + half + 1);
      t << train[i].first << " " << train[i].second << " "
        << (prefix[e] - prefix[b]) / static_cast<double>(e - b) << "\n";
    }
    for (const auto& [step, loss] : val) v << step << " " << loss << "\n";
    std::ofstream s(tmp + "/plot.gp");
    s << "set terminal pngcairo size 1000,600 font 'sans,11'\n"
      << "set output 'loss.png'\n"
      << "set title 'training and validation loss'\n"
      << "set xlabel 'step'\nset ylabel 'loss (nats per token)'\nset grid\nset key top right\n"
      << "plot ";
    if (!train.empty()) {
      s << "'train.dat' using 1:2 with lines lw 1 lc rgb '#a6bddb' title 'training (each step)', "
        << "'train.dat' using 1:3 with lines lw 2 lc rgb '#045a8d' title 'training (moving mean)'"
        << (val.empty() ? "" : ", ");
    }
    if (!val.empty()) {
      s << "'val.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.8 lc rgb '#d95f0e' "
           "title 'validation'";
    }
    s << "\n";
  }
  const std::string cmd = "cd '" + tmp + "' && '" + gnuplot + "' plot.gp 2> gnuplot.err";
  const int rc = std::system(cmd.c_str());
  std::string err;
  {
    std::ifstream e(tmp + "/gnuplot.err");
    std::getline(e, err);
  }
  const bool ok = rc == 0 && fs::exists(tmp + "/loss.png");
  if (ok) {
    std::error_code ec;
    fs::rename(tmp + "/loss.png", png, ec);
    if (ec) {  // another file system: copy, then replace
      fs::copy_file(tmp + "/loss.png", png + ".tmp", fs::copy_options::overwrite_existing);
      fs::rename(png + ".tmp", png);
    }
  }
  fs::remove_all(tmp);
  if (!ok) throw Error("gnuplot failed" + (err.empty() ? std::string() : ": " + err));
}

}  // namespace aviary::train
