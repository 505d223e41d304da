// A scripted model and a World-like tokenizer for chat tests: the model's most likely next
// token is the next byte of a script, counted from the last ':' it was fed (so every reply
// after "Assistant:" follows the script), and the tokenizer has a single token for "\n\n" and
// an end-of-text id, like the World and GPT-NeoX vocabularies.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/tokenizer.h"
#include "models/model_impl.h"

namespace aviary::testing {

// Bytes 0..255 are themselves, except that id 0 is end-of-text; 256 is "\n\n".
class FakeWorldTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kDoubleNewline = 256;
  std::string name() const override { return "fake-world"; }
  int32_t vocab_size() const override { return 257; }
  std::optional<int32_t> end_of_text() const override { return 0; }
  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '\n' && i + 1 < text.size() && text[i + 1] == '\n') {
        ids.push_back(kDoubleNewline);
        ++i;
      } else {
        ids.push_back(static_cast<unsigned char>(text[i]));
      }
    }
    return ids;
  }
  std::string Decode(std::span<const int32_t> ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id == kDoubleNewline) out += "\n\n";
      else if (id == 0) out += "";  // end-of-text has no text
      else if (id > 0 && id < 256) out += static_cast<char>(id);
      else throw Error("token id " + std::to_string(id) + " is outside the fake vocabulary");
    }
    return out;
  }
};

// Scripted model over `n_vocab` tokens: after the last ':' fed it predicts script[i] (as a
// token id) with logit 20 and everything else 0; past the end of the script it predicts
// `tail`. State: one float per layer, the position in the script.
class ScriptedModel final : public RwkvModel {
 public:
  ScriptedModel(std::vector<int32_t> script, int32_t tail, int n_vocab)
      : RwkvModel(MakeInfo(n_vocab)), script_(std::move(script)), tail_(tail) {}

 protected:
  void Forward(std::span<const int32_t> tokens, std::span<const Segment> segments) const override {
    for (const Segment& g : segments) {
      float* state = g.state;
      for (int t = g.t0; t < g.t1; ++t) {
        state[0] = tokens[t] == ':' ? 0.0f : state[0] + 1.0f;
        if (g.logits && (g.all_positions || t + 1 == g.t1)) {
          float* row = g.logits + (g.all_positions ? (t - g.t0) * info_.n_vocab : 0);
          std::fill_n(row, info_.n_vocab, 0.0f);
          const size_t i = static_cast<size_t>(state[0]);
          row[i < script_.size() ? script_[i] : tail_] = 20.0f;
        }
      }
    }
  }
  size_t StateFloatsPerLayer() const override { return 1; }

 private:
  static ModelInfo MakeInfo(int n_vocab) {
    ModelInfo info;
    info.path = "scripted-model";
    info.format = "test";
    info.n_layer = 1;
    info.n_embd = 1;
    info.n_head = 1;
    info.head_size = 1;
    info.n_vocab = n_vocab;
    info.fingerprint = 0x5c819ed;
    return info;
  }
  std::vector<int32_t> script_;
  int32_t tail_;
};

// Token ids of a byte string (for scripts).
inline std::vector<int32_t> Bytes(std::string_view s) {
  std::vector<int32_t> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

}  // namespace aviary::testing
