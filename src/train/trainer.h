// A training run: data, model, optimiser and the step loop, with its directory of outputs.
//
//   DIR/log.jsonl      one JSON object per step (and per validation)
//   DIR/checkpoint/    weights, both Adam moments, step, sampler and options (--resume DIR)
//   DIR/model.pth      the trained weights as BlinkDL's code and torch.load read them
//   DIR/model.gguf     the same as aviary's GGUF
//   DIR/adapter.pth    --tune lora: the adapters alone (RWKV-PEFT's names), instead of the model
//   DIR/adapter.json   --tune lora: rank, alpha, targets and the base model, for merge-lora
//   DIR/state.avstate  --tune state: the tuned start state (aviary chat --load-state)
//   DIR/state.pth      --tune state: the same as RWKV-PEFT's blocks.N.att.time_state
//   DIR/data/          the tokenized training data (binidx), reused by later runs
//
// The run is deterministic: the same options, data and thread count give bit-identical losses,
// and a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "aviary/runtime.h"
#include "aviary/tokenizer.h"

namespace aviary::train {

// The tokenizer a run encodes its data with.
struct TrainingTokenizer {
  std::unique_ptr<Tokenizer> tokenizer;
  std::shared_ptr<const TokenizerData> data;  // embedded into model.gguf (null: bytes)
  std::string spec;  // what --resume resolves again: "bytes" or the vocabulary file's path
};
// "bytes", or a World vocabulary (rwkv_vocab_v20230424.txt) or tokenizer.json file.
TrainingTokenizer LoadTrainingTokenizer(const std::string& spec);
// Turns --tokenizer's value into a tokenizer (the CLI resolves names such as "world" to files).
// `model_vocab` is the --init model's vocabulary size, 0 from scratch.
using TokenizerResolver =
    std::function<TrainingTokenizer(const std::string& spec, int model_vocab)>;

struct TrainOptions {
  std::vector<std::string> data;  // text, JSONL or binidx inputs
  std::string tokenizer;          // --tokenizer as given; the run keeps the resolved spec
  std::string init_model;         // finetune this model; empty: from scratch
  int layers = 0, embd = 0;       // from scratch
  int ctx_len = 512;
  // Longer context: each window runs as consecutive chunks of chunk_len tokens, the state
  // carried forward and its gradient carried back (0: the whole window at once). Activations
  // are kept for one chunk at a time, so memory follows chunk_len, not ctx_len.
  int chunk_len = 0;
  // The gradient flows back through at most this many chunks (truncated backpropagation
  // through time; 0: through the whole window).
  int grad_chunks = 0;
  int batch = 8;
  int64_t steps = 1000;
  double lr = 6e-4, lr_final = 1e-5;
  int64_t warmup = 10;
  double weight_decay = 0.0;
  double grad_clip = 1.0;
  uint64_t seed = 0;
  double val_fraction = 0.1;
  int64_t eval_every = 100;
  int eval_windows = 64;  // validation windows scored each time (at most)
  int64_t save_every = 500;
  // What is trained. "full": every weight (from scratch or --init). "lora": low-rank adapters
  // on the large matrices of the --init model, which stays frozen as stored (any weight type);
  // the run writes adapter.pth + adapter.json. "state": the initial wkv state of the frozen
  // --init model; the run writes state.avstate (+ state.pth).
  std::string tune = "full";
  int lora_rank = 0;                      // lora: the adapters' rank R
  double lora_alpha = 0;                  // lora: the adapters' scale is alpha / R (0: alpha = R)
  std::vector<std::string> lora_targets;  // lora: kRwkv7MatrixNames (empty: all six)
  std::string pth_type = "f32";           // the exported weights: "f32" (as trained) or "bf16"
  std::string out_dir;
};

// What the loop reports after each step.
struct StepReport {
  int64_t step = 0;      // steps done, 1..steps
  int64_t steps = 0;     // of the run
  double loss = 0;       // this step's mean training loss
  double val_loss = -1;  // when this step ran a validation: its mean loss; else < 0
  double lr = 0;
  double grad_norm = 0;
  double tokens_per_second = 0;  // training tokens over the run's training time so far
  double elapsed_seconds = 0;
  double eta_seconds = 0;
};

// What the run says about itself before the first step (the CLI prints it).
struct RunSummary {
  std::string model;  // e.g. "RWKV-7, 4 layers x 128, vocabulary 256, head size 64"
  int64_t parameters = 0;
  uint64_t train_tokens = 0, validation_tokens = 0;
  bool resumed = false;
  int64_t start_step = 0;
  int batch = 0;  // windows per step, over all processes
  // Memory: the four flat buffers, the activations kept for the backward pass (one chunk's),
  // and with --chunk-len the start state of every chunk of a step's windows.
  size_t weight_bytes = 0, gradient_bytes = 0, adam_bytes = 0, activation_bytes = 0;
  size_t chunk_state_bytes = 0;
  std::string tune;         // TrainOptions::tune
  size_t frozen_bytes = 0;  // lora, state: the frozen base (large matrices as stored, mapped)
};

class Trainer {
 public:
  // A new run into options.out_dir (refused when it already holds a run).
  static std::unique_ptr<Trainer> Start(const TrainOptions& options,
                                        const TokenizerResolver& tokenizers, Runtime& runtime);
  // Continues the run in `dir`; `steps` > 0 extends or shortens the run's total.
  static std::unique_ptr<Trainer> Resume(const std::string& dir, int64_t steps,
                                         const TokenizerResolver& tokenizers, Runtime& runtime);
  ~Trainer();

  const RunSummary& summary() const;
  // Runs the remaining steps; `on_step` after each. Writes the checkpoint every save_every
  // steps and at the end, then model.pth and model.gguf. Once per Trainer: it ends by freeing
  // the gradients, moments and activations.
  // `stop` (when given) is asked after each step: true saves the checkpoint there and returns
  // false without the exports (the run continues with --resume); true when the run finished.
  bool Run(const std::function<void(const StepReport&)>& on_step,
           const std::function<bool()>& stop = {});
  // Mean validation loss over the run's validation windows (< 0 without validation data).
  double ValidationLoss();

 private:
  struct Impl;
  explicit Trainer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The options a checkpoint recorded (its index's "options" object) as TrainOptions writing to
// `dir`. Throws aviary::Error starting with `dir` when a field is missing, of the wrong type,
// or a count out of range.
TrainOptions OptionsFromJson(const nlohmann::json& j, const std::string& dir);

// Writes a PNG of the training and validation loss in `log` (a log.jsonl) with gnuplot.
// Throws aviary::Error naming the problem (no gnuplot, an unreadable or empty log).
void PlotLoss(const std::string& log, const std::string& png);

}  // namespace aviary::train
