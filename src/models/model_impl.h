// Shared by the per-version model files: shape-checked weight access, scratch memory, the
// token-range loop, and the parts every RWKV version has (embedding + ln0 in, ln_out + head
// out). The stages of a layer are in stages.h.
#pragma once

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

  // Sequence mode processes at most kMaxChunk tokens per forward pass; longer inputs are fed in
  // chunks (same result, bounded scratch memory). A chunk hands its products to the threads
  // once per matrix, so longer chunks pay that hand-off less often, while the scratch grows with
  // the chunk (docs/PERFORMANCE.md has the measurements behind 128).
  static constexpr int kMaxChunk = 128;

 protected:
  RwkvModel(WeightFile wf, ModelInfo info);
  // A model without a weight file, whose Forward computes everything itself (test doubles).
  explicit RwkvModel(ModelInfo info) : Model(std::move(info)) {}

  // Per-version forward over tokens[0..T) with T <= kMaxChunk. `logits` is nullptr or has
  // room for `T` rows (all_positions) or one row (last token only).
  virtual void Forward(std::span<const int32_t> tokens, float* state, float* logits,
                       bool all_positions) const = 0;
  // Floats of recurrent state per layer, and its initial value (zero except v4's pp = -1e30).
  virtual size_t StateFloatsPerLayer() const = 0;
  virtual void InitLayerState(float* layer_state) const;

  // x[t] = ln0(emb[tokens[t]]).
  void Embed(std::span<const int32_t> tokens, float* x) const;
  // ln_out then head, for every row of x (all_positions) or only the last.
  void Head(const float* x, int T, float* logits, bool all_positions) const;

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

constexpr float kLayerNormEps = 1e-5f;

}  // namespace aviary
