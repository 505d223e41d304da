// Shared by the per-version model files: shape-checked weight access, scratch memory, the
// token-range loop, and the parts every RWKV version has (embedding + ln0 in, ln_out + head
// out). The stages of a layer are in stages.h.
#pragma once

#include <algorithm>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aviary/model.h"
#include "formats/weight_file.h"
#include "tensor/aligned.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"

namespace aviary {

// Reusable per-thread scratch: the same sequence of Take() sizes reuses the same blocks, so a
// steady token loop allocates nothing.
class Scratch {
 public:
  static Scratch& ForThisThread();
  void Reset() { next_ = 0; }
  float* Take(size_t n);
  // Bytes held in blocks, in use or not (what the scratch adds to the process's memory).
  size_t BytesHeld() const;

  // Blocks taken while a Scope lives are handed back when it ends, so a helper that runs once
  // per layer reuses one set of blocks instead of taking a new set for every layer (the scratch
  // of a chunk would otherwise grow with the layer count: the channel mix's hidden activations
  // alone are T x n_ffn floats per layer).
  class Scope {
   public:
    explicit Scope(Scratch& s) : scratch_(s), mark_(s.next_) {}
    ~Scope() { scratch_.next_ = mark_; }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Scratch& scratch_;
    size_t mark_;
  };

 private:
  std::vector<AlignedVector<float>> blocks_;  // aligned: the matrix kernels stream them
  size_t next_ = 0;
};

// Shape-checked access to a WeightFile's tensors; errors name the file and the tensor.
class Weights {
 public:
  explicit Weights(const WeightFile& wf) : wf_(wf) {}
  bool Has(const std::string& name) const { return wf_.Find(name) != nullptr; }
  const Tensor& Get(const std::string& name) const;
  // A tensor of exactly this shape (leading 1-sized dimensions ignored).
  const Tensor& Matrix(const std::string& name, std::vector<int64_t> shape) const;
  // Any shape with n elements, widened to float (small parameters only).
  std::vector<float> Vector(const std::string& name, int64_t n) const;
  [[noreturn]] void Fail(const std::string& problem) const;

 private:
  const WeightFile& wf_;
};

// The chunked sequence-mode evaluation every version shares, over a per-version Forward.
class RwkvModel : public Model {
 public:
  State NewState() const override;
  void Eval(std::span<const int32_t> tokens, State& state, std::vector<float>* logits,
            bool all_positions = false) const override;
  void EvalBatch(std::span<const BatchItem> items) const override;

  // A forward pass processes at most kMaxChunk tokens (rows), of one sequence (Eval) or of
  // several (EvalBatch); longer inputs are fed in chunks (same result, bounded scratch memory).
  // A chunk hands its products to the threads once per matrix, so longer chunks pay that
  // hand-off less often, while the scratch grows with the chunk (docs/PERFORMANCE.md has the
  // measurements behind 128).
  static constexpr int kMaxChunk = 128;

 protected:
  RwkvModel(WeightFile wf, ModelInfo info);
  // A model without a weight file, whose Forward computes everything itself (test doubles).
  explicit RwkvModel(ModelInfo info) : Model(std::move(info)) {}

  // One sequence's rows of a forward pass: rows [t0, t1) continue the sequence whose state is
  // `state` (its floats, advanced in place). `logits` is null or receives n_vocab floats for
  // the last row, or for every row when `all_positions` is set.
  struct Segment {
    int t0 = 0, t1 = 0;
    float* state = nullptr;
    float* logits = nullptr;
    bool all_positions = false;
    int rows() const { return t1 - t0; }
  };

  // Per-version forward over the rows tokens[0..T), T <= kMaxChunk, split into `segments`
  // (in order, covering [0, T)). Row stages and products run over all T rows at once; the
  // stages that read or write a state (token shift, WKV) run per segment on its own rows.
  virtual void Forward(std::span<const int32_t> tokens,
                       std::span<const Segment> segments) const = 0;
  // Floats of recurrent state per layer, and its initial value (zero except v4's pp = -1e30).
  virtual size_t StateFloatsPerLayer() const = 0;
  virtual void InitLayerState(float* layer_state) const;

  // Throws unless `state` belongs to this model.
  void CheckState(const State& state) const;

  // x[t] = ln0(emb[tokens[t]]).
  void Embed(std::span<const int32_t> tokens, float* x) const;
  // ln_out then head, for the rows of x (T, C) whose logits a segment asks for: only those
  // rows are multiplied (the head is the largest matrix).
  void Head(const float* x, std::span<const Segment> segments) const;

  int C() const { return info_.n_embd; }
  const Weights& weights() const { return weights_; }
  static std::string Block(int layer, const char* suffix) {
    return "blocks." + std::to_string(layer) + "." + suffix;
  }

  WeightFile file_;
  Weights weights_{file_};
  Tensor emb_, head_;
  std::vector<float> ln0_w_, ln0_b_, ln_out_w_, ln_out_b_;
};

// fn(t0, t1) over token ranges that cover [0, T): spread over the thread pool for a long
// prompt, inline for a few tokens (generation pays no hand-off). Only for work in which each
// token's results depend on that token's inputs alone, so the split changes no result.
template <typename F>
void ForTokens(int T, F&& fn) {
  ParallelForRanges(T, /*chunk=*/8, [&](int64_t t0, int64_t t1) {
    fn(static_cast<int>(t0), static_cast<int>(t1));
  });
}

// fn(segment) for every segment: the per-sequence stages (the WKV recurrences). Segments run
// in parallel when none dominates the pass (decoding: many one-row segments, each too small to
// split over heads); otherwise one after the other, each kernel spreading its own heads over
// the pool. Each segment's result is the same either way (the kernels' work never depends on
// the thread).
template <typename Segments, typename F>
void ForSegments(const Segments& segments, int T, F&& fn) {
  int widest = 0;
  for (const auto& s : segments) widest = std::max(widest, s.rows());
  if (segments.size() == 1 || 2 * widest > T) {
    for (const auto& s : segments) fn(s);
    return;
  }
  ParallelFor(static_cast<int64_t>(segments.size()),
              [&](int64_t i, int) { fn(segments[static_cast<size_t>(i)]); });
}

constexpr float kLayerNormEps = 1e-5f;

}  // namespace aviary
