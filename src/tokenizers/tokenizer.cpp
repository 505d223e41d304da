#include "aviary/tokenizer.h"

#include "aviary/error.h"
#include "aviary/model.h"

namespace aviary {
namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  std::string name() const override { return "bytes"; }
  int32_t vocab_size() const override { return 256; }
  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) ids.push_back(c);  // unsigned: bytes >= 0x80 are 128..255
    return ids;
  }
  std::string Decode(std::span<const int32_t> ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || id > 255) {
        throw Error("token id " + std::to_string(id) + " is outside the byte vocabulary (0..255)");
      }
      out.push_back(static_cast<char>(id));
    }
    return out;
  }
};

// Length of the UTF-8 sequence a lead byte announces; 0 for a byte that cannot lead one.
int Utf8Length(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) return 2;
  if (c >= 0xe0 && c <= 0xef) return 3;
  if (c >= 0xf0 && c <= 0xf4) return 4;
  return 0;
}

}  // namespace

std::unique_ptr<Tokenizer> MakeByteTokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> TokenizerForModel(const ModelInfo& info) {
  if (info.n_vocab == 256) return MakeByteTokenizer();
  throw Error(info.path + ": vocabulary of " + std::to_string(info.n_vocab) +
              " tokens needs the World or GPT-NeoX tokenizer, which aviary does not read yet; "
              "only byte-level (256) models are supported");
}

std::string Utf8Stream::Push(std::string_view bytes) {
  pending_.append(bytes);
  // Find where the last (possibly incomplete) character starts.
  size_t cut = pending_.size();
  for (size_t back = 1; back <= 4 && back <= pending_.size(); ++back) {
    const unsigned char c = pending_[pending_.size() - back];
    if ((c & 0xc0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const int need = Utf8Length(c);
    if (need > static_cast<int>(back)) cut = pending_.size() - back;  // incomplete: hold it
    break;
  }
  std::string ready = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return ready;
}

std::string Utf8Stream::Flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace aviary
