// Training data: text and JSONL tokenized into a binidx dataset (train/binidx.h), split into a
// training part and a validation tail, and cut into windows of ctx_len + 1 tokens (inputs are
// the first ctx_len, targets the same shifted by one).
//
// Training windows are drawn as RWKV-LM's trainer draws them (its dataset.py): window n starts
// at token ((factor * ii^3) mod p) * ctx_len with ii = 1 + n, where p, the "magic prime", is
// the largest prime with p % 3 == 2 and (p + 1) * ctx_len < training tokens (demo-training-
// prepare.sh: "the largest 3n+2 prime smaller than datalen/ctxlen-1") and factor =
// int(p * (sqrt(5) - 1) / 2). Since cubing is a bijection modulo such a prime, every run of p
// consecutive draws visits each of the p windows once. Seed 0 gives exactly the official
// sequence (one process, windows counted across its mini-epochs); another seed picks another
// factor and another starting point, so another order.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/tokenizer.h"
#include "train/binidx.h"

namespace aviary::train {

// ---------------------------------------------------------------------------------------------
// Tokenizing

// Where the tokens of `inputs` are, tokenized now or found from an earlier run.
struct PreparedData {
  std::string prefix;   // PREFIX.bin + PREFIX.idx
  bool reused = false;  // an existing dataset: a binidx input, or the cache in OUT_DIR/data
  uint64_t tokens = 0;
  uint64_t documents = 0;
};

// Called now and then while tokenizing: input bytes done so far, and in all.
using TokenizeProgress = std::function<void(uint64_t done_bytes, uint64_t total_bytes)>;

// Tokenizes `inputs` into OUT_DIR/data/tokens.{bin,idx} (written with data/manifest.json, which
// records the inputs and the tokenizer), or reuses that dataset when the manifest shows it was
// made from the same files (same paths and sizes, and same modification times or else the same
// SHA-256 of the content) with the same tokenizer.
//   - FILE.jsonl: one document per line, the line a JSON object with a "text" string; blank
//     lines are skipped. A line that is not JSON, or has no "text" string, is an error
//     "FILE:LINE: ...".
//   - any other file: plain text, the whole file one document.
//   - a binidx dataset (PREFIX, PREFIX.bin or PREFIX.idx with both files present), given alone:
//     used where it is, untouched.
// Each document is followed by the tokenizer's end-of-text token (token 0 for World and
// GPT-NeoX, as RWKV-LM's make_data.py writes). The bytes tokenizer has no such token: its 256
// ids are all byte values, so its documents follow each other with nothing between them (a
// plain text file keeps exactly its bytes).
// Tokenizing runs on the current runtime's threads (tensor/thread_pool.h), in batches written
// in order: the files it writes are the same for any number of threads.
// Throws aviary::Error on missing or empty inputs and on data without a single token;
// UsageError on an empty list or a binidx mixed with other inputs.
PreparedData PrepareDataset(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                            const std::string& out_dir, const TokenizeProgress& progress = {});

// Cuts text into pieces at places where tokenizing the pieces one by one gives the same ids as
// tokenizing the whole: just after a '\n' between two visible ASCII characters ('!' to '~').
// No World token holds a newline followed by such a character, so its greedy longest match
// always ends a token there; GPT-NeoX's pre-tokenizer always splits there too (a newline after
// whitespace would not do: "\n\n" before a word is two pre-tokens, at the end of a piece one).
// Pieces are at least `target_bytes` long, except the last; text with no such place (CRLF line
// ends, for one) is one piece.
std::vector<std::string_view> TextPieces(std::string_view text, size_t target_bytes);

// Calls `fn(text, line, line_end)` for each document of a JSONL file's bytes (line counted from
// 1; line_end: the offset just past the line). `name` is the file, for errors
// ("NAME:LINE: not valid JSON: ...", "NAME:LINE: no \"text\" string in the object").
using JsonlTextFn = std::function<void(std::string_view text, uint64_t line, size_t line_end)>;
void ForEachJsonlText(std::string_view bytes, const std::string& name, const JsonlTextFn& fn);

// ---------------------------------------------------------------------------------------------
// Training and validation windows

struct TokenRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  uint64_t size() const { return end - begin; }
};

struct DataSplit {
  TokenRange train;
  TokenRange validation;  // empty when val_fraction is 0
};
// The last `val_fraction` of `tokens` is validation: training is the first
// floor(tokens * (1 - val_fraction)) tokens (nanoGPT's int(n * 0.9) for 0.1), validation the
// rest. Throws UsageError unless 0 <= val_fraction < 1.
DataSplit SplitTokens(uint64_t tokens, double val_fraction);

// The largest prime p with p % 3 == 2 and (p + 1) * ctx_len < tokens; 0 when there is none
// (fewer than 3 * ctx_len + 1 tokens).
uint64_t MagicPrime(uint64_t tokens, int ctx_len);

// Training windows, drawn as RWKV-LM draws them (see the top of this file), never leaving
// `range`. Its state is the number of windows drawn: a sampler restored to another's State()
// (same dataset, range, ctx_len and seed) draws what that one would have drawn next. `data`
// must outlive the sampler (and the ValidationWindows below).
class WindowSampler {
 public:
  // Throws aviary::Error when `range` holds too few tokens for windows of ctx_len + 1 (at least
  // 3 ctx_len + 1) and UsageError on a ctx_len below 1 or a range outside the dataset.
  // Tokens outside [0, vocab_size) are an error when a window reaches them.
  WindowSampler(const TokenDataset& data, TokenRange range, int ctx_len, uint64_t seed,
                int32_t vocab_size);

  // Draws `batch` windows: window b's tokens t = 0..ctx_len-1 go to inputs[b * ctx_len + t],
  // its tokens t + 1 to targets[b * ctx_len + t].
  void Next(int batch, int32_t* inputs, int32_t* targets);

  uint64_t State() const { return drawn_; }
  void Restore(uint64_t state) { drawn_ = state; }

  // The first token of the n-th window drawn (n from 0), an offset into the dataset.
  uint64_t WindowStart(uint64_t n) const;
  uint64_t magic_prime() const { return prime_; }
  int ctx_len() const { return ctx_len_; }

 private:
  const TokenDataset& data_;
  TokenRange range_;
  int ctx_len_;
  int32_t vocab_size_;
  uint64_t prime_;
  uint64_t factor_;
  uint64_t start_;  // added to ii, below the prime
  uint64_t drawn_ = 0;
};

// Fixed validation windows over `range`: consecutive windows of ctx_len + 1 tokens starting
// ctx_len apart (so each target token is scored once), at most `max_windows` of them, spread
// evenly over the range when it holds more.
class ValidationWindows {
 public:
  // An empty range gives no windows; a non-empty range too short for one window is an
  // aviary::Error.
  ValidationWindows(const TokenDataset& data, TokenRange range, int ctx_len, int max_windows,
                    int32_t vocab_size);

  int count() const { return count_; }
  uint64_t tokens() const { return uint64_t(count_) * ctx_len_; }  // targets scored
  // Fills windows first .. first + n - 1 (layout as WindowSampler::Next) and returns n, the
  // smaller of `batch` and the windows left from `first`.
  int Fill(int first, int batch, int32_t* inputs, int32_t* targets) const;
  uint64_t WindowStart(int index) const;

 private:
  const TokenDataset& data_;
  TokenRange range_;
  int ctx_len_;
  int32_t vocab_size_;
  uint64_t slots_ = 0;  // windows the range holds
  int count_ = 0;
};

}  // namespace aviary::train
