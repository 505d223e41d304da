// Loading (format -> version, from the version table in versions.cpp -> per-version model) and
// the version-independent parts of running a model: token checks, chunking, embedding and head.
#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>

#include "aviary/error.h"
#include "formats/mapped_file.h"
#include "models/model_impl.h"
#include "models/stages.h"
#include "models/versions.h"
#include "tensor/kernels.h"

namespace aviary {

// ---- Scratch ----

Scratch& Scratch::ForThisThread() {
  thread_local Scratch scratch;
  return scratch;
}

float* Scratch::Take(size_t n) {
  if (n == 0) n = 1;
  if (next_ == blocks_.size()) blocks_.emplace_back();
  if (blocks_[next_].size() < n) {
    blocks_[next_] = AlignedVector<float>();  // free first: no old + new peak
    blocks_[next_].resize(n);
  }
  return blocks_[next_++].data();
}

size_t Scratch::BytesHeld() const {
  size_t bytes = 0;
  for (const auto& b : blocks_) bytes += b.size() * sizeof(float);
  return bytes;
}

// ---- Weights ----

void Weights::Fail(const std::string& problem) const { throw Error(wf_.path + ": " + problem); }

const Tensor& Weights::Get(const std::string& name) const {
  const Tensor* t = wf_.Find(name);
  if (!t) Fail("missing tensor '" + name + "'");
  return *t;
}

static std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

const Tensor& Weights::Matrix(const std::string& name, std::vector<int64_t> shape) const {
  const Tensor& t = Get(name);
  std::vector<int64_t> got = t.shape;
  // Leading 1s are harmless for a matrix (rows() and row() ignore them), but a 3-D tensor is
  // sliced along its first dimension (Tensor::Slice), so it must have exactly that shape.
  while (shape.size() <= 2 && got.size() > shape.size() && got.front() == 1) {
    got.erase(got.begin());
  }
  if (got != shape) {
    Fail("tensor '" + name + "' has shape " + ShapeString(t.shape) + ", expected " +
         ShapeString(shape));
  }
  return t;
}

std::vector<float> Weights::Vector(const std::string& name, int64_t n) const {
  const Tensor& t = Get(name);
  if (t.numel() != n) {
    Fail("tensor '" + name + "' has shape " + ShapeString(t.shape) + " (" +
         std::to_string(t.numel()) + " elements), expected " + std::to_string(n) + " elements");
  }
  std::vector<float> v(n);
  DequantizeRow(t.type, t.data, v.data(), n);
  return v;
}

// ---- Shared model parts ----

RwkvModel::RwkvModel(WeightFile wf, ModelInfo info) : Model(std::move(info)), file_(std::move(wf)) {
  const int V = info_.n_vocab;
  emb_ = weights_.Matrix("emb.weight", {V, C()});
  head_ = weights_.Matrix("head.weight", {V, C()});
  ln0_w_ = weights_.Vector("blocks.0.ln0.weight", C());
  ln0_b_ = weights_.Vector("blocks.0.ln0.bias", C());
  ln_out_w_ = weights_.Vector("ln_out.weight", C());
  ln_out_b_ = weights_.Vector("ln_out.bias", C());
}

void RwkvModel::Embed(std::span<const int32_t> tokens, float* x) const {
  std::vector<float> row(C());
  for (size_t t = 0; t < tokens.size(); ++t) {
    GatherRow(emb_, tokens[t], row.data());
    LayerNorm(row.data(), ln0_w_.data(), ln0_b_.data(), C(), kLayerNormEps, x + t * C());
  }
}

void RwkvModel::Head(const float* x, std::span<const Segment> segments) const {
  const size_t n = C(), V = info_.n_vocab;
  size_t rows = 0;
  for (const Segment& g : segments) {
    if (g.logits) rows += g.all_positions ? g.rows() : 1;
  }
  if (rows == 0) return;
  Scratch& scratch = Scratch::ForThisThread();
  float* picked = scratch.Take(rows * n);  // (rows, C) the rows that need logits, in order
  float* normed = scratch.Take(rows * n);
  // When the destinations are one block in row order (Eval: one segment), the product writes
  // there directly; otherwise into scratch, then each row to its segment's vector.
  float* const first_out = std::find_if(segments.begin(), segments.end(), [](const Segment& g) {
                             return g.logits != nullptr;
                           })->logits;
  bool direct = true;
  size_t i = 0;
  for (const Segment& g : segments) {
    if (!g.logits) continue;
    const int first = g.all_positions ? g.t0 : g.t1 - 1;
    for (int t = first; t < g.t1; ++t, ++i) {
      std::copy_n(x + t * n, n, picked + i * n);
      direct = direct && g.logits + (t - first) * V == first_out + i * V;
    }
  }
  LayerNormRows(picked, ln_out_w_, ln_out_b_, static_cast<int>(rows), C(), kLayerNormEps, normed);
  float* out = direct ? first_out : scratch.Take(rows * V);
  MatMul(head_, normed, static_cast<int>(rows), out);
  if (direct) return;
  i = 0;
  for (const Segment& g : segments) {
    if (!g.logits) continue;
    const int first = g.all_positions ? g.t0 : g.t1 - 1;
    for (int t = first; t < g.t1; ++t, ++i) {
      std::copy_n(out + i * V, V, g.logits + (t - first) * V);
    }
  }
}

// ---- Model ----

static void CheckTokens(std::span<const int32_t> tokens, int n_vocab, const std::string& where) {
  for (int32_t t : tokens) {
    if (t < 0 || t >= n_vocab) {
      throw Error(where + "token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                  std::to_string(n_vocab - 1) + ")");
    }
  }
}

Model::~Model() = default;

Runtime& Model::runtime() const { return runtime_ ? *runtime_ : *Runtime::Default(); }

void Model::CheckBatch(std::span<const BatchItem> items) const {
  std::vector<const void*> states, logits;
  for (size_t i = 0; i < items.size(); ++i) {
    const BatchItem& item = items[i];
    const std::string where = "batch item " + std::to_string(i) + ": ";
    if (!item.state) throw UsageError(where + "no state");
    if (item.state->model_fingerprint() != info_.fingerprint) {
      throw UsageError(where + "state does not belong to model " + info_.path);
    }
    if (item.tokens.empty()) throw UsageError(where + "no tokens to evaluate");
    CheckTokens(item.tokens, info_.n_vocab, where);
    states.push_back(item.state);
    if (item.logits) logits.push_back(item.logits);
  }
  // Two items advancing one state would each start from the other's result.
  for (auto* list : {&states, &logits}) {
    std::sort(list->begin(), list->end(), std::less<>());
    if (std::adjacent_find(list->begin(), list->end()) != list->end()) {
      throw UsageError(list == &states ? "the same state is in two batch items"
                                       : "the same logits vector is in two batch items");
    }
  }
}

void Model::EvalBatch(std::span<const BatchItem> items) const {
  CheckBatch(items);
  for (const BatchItem& item : items) Eval(item.tokens, *item.state, item.logits);
}

void RwkvModel::InitLayerState(float* layer_state) const {
  std::fill_n(layer_state, StateFloatsPerLayer(), 0.0f);
}

State RwkvModel::NewState() const {
  State s;
  s.fingerprint_ = info_.fingerprint;
  s.n_layer_ = static_cast<uint32_t>(info_.n_layer);
  const size_t per_layer = StateFloatsPerLayer();
  s.data_.resize(per_layer * info_.n_layer);
  for (int l = 0; l < info_.n_layer; ++l) InitLayerState(s.data_.data() + l * per_layer);
  return s;
}

void RwkvModel::CheckState(const State& state) const {
  if (state.fingerprint_ != info_.fingerprint ||
      state.data_.size() != StateFloatsPerLayer() * info_.n_layer) {
    throw UsageError("state does not belong to model " + info_.path);
  }
}

void RwkvModel::Eval(std::span<const int32_t> tokens, State& state, std::vector<float>* logits,
                     bool all_positions) const {
  CheckState(state);
  if (tokens.empty()) throw UsageError("no tokens to evaluate");
  CheckTokens(tokens, info_.n_vocab, "");
  const ScopedRuntime on_runtime(runtime_.get());  // the kernels below run on the model's runtime
  const size_t V = info_.n_vocab;
  if (logits) logits->assign(all_positions ? tokens.size() * V : V, 0.0f);
  const size_t chunk = kMaxChunk;
  for (size_t start = 0; start < tokens.size(); start += chunk) {
    const size_t n = std::min(chunk, tokens.size() - start);
    const bool last_chunk = start + n == tokens.size();
    Segment whole{0, static_cast<int>(n), state.data_.data(), nullptr, all_positions};
    if (logits && all_positions) whole.logits = logits->data() + start * V;
    if (logits && !all_positions && last_chunk) whole.logits = logits->data();
    Scratch::ForThisThread().Reset();
    Forward(tokens.subspan(start, n), std::span(&whole, 1));
  }
  state.tokens_seen_ += tokens.size();
}

void RwkvModel::EvalBatch(std::span<const BatchItem> items) const {
  CheckBatch(items);
  for (size_t i = 0; i < items.size(); ++i) {
    try {
      CheckState(*items[i].state);
    } catch (const Error& e) {
      throw UsageError("batch item " + std::to_string(i) + ": " + e.what());
    }
  }
  const ScopedRuntime on_runtime(runtime_.get());
  for (const BatchItem& item : items) {
    if (item.logits) item.logits->assign(info_.n_vocab, 0.0f);
  }
  // Passes of up to kMaxChunk rows: the items in order, one that does not fit in the room left
  // continuing at the start of the next pass.
  int32_t tokens[kMaxChunk];
  Segment segments[kMaxChunk];
  size_t item = 0, done = 0;  // the next row is items[item].tokens[done]
  while (item < items.size()) {
    int T = 0, n_segments = 0;
    while (item < items.size() && T < kMaxChunk) {
      const BatchItem& it = items[item];
      const size_t n = std::min(it.tokens.size() - done, static_cast<size_t>(kMaxChunk - T));
      std::copy_n(it.tokens.begin() + done, n, tokens + T);
      done += n;
      const bool ends = done == it.tokens.size();
      segments[n_segments++] = {T, T + static_cast<int>(n), it.state->data_.data(),
                                ends && it.logits ? it.logits->data() : nullptr, false};
      T += static_cast<int>(n);
      if (ends) ++item, done = 0;
    }
    Scratch::ForThisThread().Reset();
    Forward(std::span(tokens, T), std::span(segments, n_segments));
  }
  for (const BatchItem& it : items) it.state->tokens_seen_ += it.tokens.size();
}

// ---- Loading ----

namespace {

const VersionSpec& DetectArch(const WeightFile& wf) {
  const VersionSpec* v = DetectVersion([&](const std::string& name) { return wf.Find(name); });
  if (!v) throw Error(wf.path + ": unrecognised architecture (no known blocks.0.att tensors)");
  return *v;
}

uint64_t Fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// Hashes names, types, shapes, every small tensor whole and the first bytes of large ones:
// O(metadata), and different for any two real checkpoints.
uint64_t Fingerprint(const WeightFile& wf, Arch arch) {
  uint64_t h = 0xcbf29ce484222325ull;
  const uint32_t a = static_cast<uint32_t>(arch);
  h = Fnv1a(h, &a, sizeof a);
  for (const auto& [name, t] : wf.tensors) {
    h = Fnv1a(h, name.data(), name.size());
    const uint8_t type = static_cast<uint8_t>(t.type);
    h = Fnv1a(h, &type, 1);
    h = Fnv1a(h, t.shape.data(), t.shape.size() * sizeof(int64_t));
    h = Fnv1a(h, t.data, std::min<size_t>(t.nbytes, 4096));
  }
  return h;
}

ModelInfo DescribeFile(const WeightFile& wf) {
  ModelInfo info;
  info.path = wf.path;
  info.format = wf.format;
  info.file_size = wf.file_size;
  info.load_mode = wf.load_mode;
  info.main_type = std::string(DTypeName(wf.main_type));
  info.tokenizer_data = wf.tokenizer;
  info.notes = wf.notes;
  const VersionSpec& version = DetectArch(wf);
  info.arch = version.arch;
  Weights w(wf);
  const Tensor& emb = w.Get("emb.weight");
  if (emb.shape.size() != 2) w.Fail("tensor 'emb.weight' must be 2-D");
  info.n_vocab = static_cast<int>(emb.shape[0]);
  info.n_embd = static_cast<int>(emb.shape[1]);
  if (wf.n_vocab && wf.n_vocab != info.n_vocab) {
    w.Fail("header says n_vocab " + std::to_string(wf.n_vocab) + " but emb.weight has " +
           std::to_string(info.n_vocab) + " rows");
  }
  if (wf.n_embd && wf.n_embd != info.n_embd) {
    w.Fail("header says n_embed " + std::to_string(wf.n_embd) + " but emb.weight is " +
           std::to_string(info.n_embd) + " wide");
  }
  // Layers: blocks.0 .. blocks.(L-1), contiguous.
  std::set<int> layers;
  static const std::regex kBlock(R"(blocks\.(\d+)\..*)");
  for (const auto& [name, t] : wf.tensors) {
    std::smatch m;
    if (std::regex_match(name, m, kBlock)) {
      if (m[1].length() > 5) w.Fail("tensor '" + name + "' has an absurd layer index");
      layers.insert(std::stoi(m[1]));
    }
    info.tensor_types[std::string(DTypeName(t.type))]++;
    info.n_params += t.numel();
  }
  info.n_layer = static_cast<int>(layers.size());
  if (info.n_layer == 0 || *layers.rbegin() != info.n_layer - 1) {
    w.Fail("layer tensors are not numbered 0.." + std::to_string(info.n_layer - 1));
  }
  if (wf.n_layer && wf.n_layer != info.n_layer) {
    w.Fail("header says n_layer " + std::to_string(wf.n_layer) + " but the file has " +
           std::to_string(info.n_layer) + " layers");
  }
  info.n_ffn = static_cast<int>(w.Get("blocks.0.ffn.key.weight").shape[0]);
  const int C = info.n_embd;
  info.n_head = 1;
  if (!version.heads_from.empty()) {
    const Tensor& t = w.Get("blocks.0." + std::string(version.heads_from));
    info.n_head = static_cast<int>(version.head_numel ? t.numel() : t.shape[0]);
  }
  if (info.n_head <= 0 || C % info.n_head != 0) {
    w.Fail("cannot split width " + std::to_string(C) + " into " + std::to_string(info.n_head) +
           " heads");
  }
  info.head_size = C / info.n_head;
  info.fingerprint = Fingerprint(wf, info.arch);
  return info;
}

std::unique_ptr<Model> Build(WeightFile wf) {
  ModelInfo info = DescribeFile(wf);
  const ModelFactory make = Version(info.arch).make;
  return make(std::move(wf), std::move(info));
}

}  // namespace

std::unique_ptr<Model> Model::LoadFromMemory(std::span<const uint8_t> bytes,
                                             const std::string& name, const LoadOptions& options) {
  std::unique_ptr<Model> model = Build(ReadWeightFile(bytes, name));
  model->runtime_ = options.runtime;
  return model;
}

std::unique_ptr<Model> Model::Load(const std::string& path, const LoadOptions& options) {
  auto file = std::make_shared<MappedFile>(path, options.load_mode);
  WeightFile wf = ReadWeightFile(file->bytes(), path);
  wf.backing = file;
  wf.load_mode = LoadModeName(file->mode());
  std::unique_ptr<Model> model = Build(std::move(wf));
  model->runtime_ = options.runtime;
  return model;
}

}  // namespace aviary
