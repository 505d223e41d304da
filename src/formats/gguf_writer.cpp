// GGUF writer: plan (names, shapes, types, offsets), metadata, then the tensors row by row.
#include "formats/gguf_writer.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <vector>

#include "aviary/error.h"
#include "formats/gguf.h"
#include "formats/gguf_names.h"
#include "models/versions.h"
#include "tensor/quantize.h"
#include "tensor/thread_pool.h"

namespace aviary {
namespace {

using gguf::NameMap;
using gguf::Role;
using gguf::ValueType;

// One GGUF tensor: the rows of its pieces (canonical tensors), one after the other.
struct OutTensor {
  std::string name;
  std::vector<int64_t> ne;  // ggml order
  DType type = DType::kF32;
  Role role = Role::kVector;
  std::vector<const Tensor*> pieces;
  uint64_t offset = 0;
  size_t nbytes = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : ne) n *= d;
    return n;
  }
};

// Matrices: PyTorch shape reversed, leading 1s dropped ([1, 1, C] -> {C}).
std::vector<int64_t> ReversedShape(const Tensor& t) {
  std::vector<int64_t> shape = t.shape;
  while (shape.size() > 1 && shape.front() == 1) shape.erase(shape.begin());
  return {shape.rbegin(), shape.rend()};
}

// Block targets leave the embedding, head and low-rank matrices in their source type, as
// rwkv.cpp's quantizer does (so its Q files are reproduced exactly); from an F32 source that
// makes q4_0 larger than f16: docs/GGUF.md advises converting to f16 first.
DType ChooseType(Role role, DType src, const std::optional<DType>& target, int64_t row) {
  if (role == Role::kVector) return DType::kF32;
  if (!target) return src;
  const DType t = *target;
  const bool block_target = IsQuantized(t);
  switch (role) {
    case Role::kDecayLora: return block_target ? src : DType::kF32;
    case Role::kLora:
    case Role::kEmbedHead: return block_target ? src : t;
    case Role::kMatrix:
      if (block_target && row % Traits(t).block_elems != 0) {
        // A row that is no whole number of K-quant super-blocks takes the 32-weight type
        // llama.cpp falls back to (at least as many bits); failing that, its source type.
        const DType fallback = t == DType::kQ4_K   ? DType::kQ5_0
                               : t == DType::kQ5_K ? DType::kQ5_1
                               : t == DType::kQ6_K ? DType::kQ8_0
                                                   : src;
        return row % Traits(fallback).block_elems == 0 ? fallback : src;
      }
      return t;
    case Role::kVector: break;
  }
  return DType::kF32;
}

class Planner {
 public:
  Planner(const WeightFile& wf, const ModelInfo& info, const GgufWriteOptions& options)
      : wf_(wf), info_(info), options_(options) {}

  std::vector<OutTensor> Plan() {
    const GgufVersion& spec = Version(info_.arch).gguf;
    auto global = [&](size_t i) {
      const NameMap& m = gguf::kGlobalNames[i];
      Add(std::string(m.gguf), m.role, {&Get(std::string(m.canonical))});
    };
    global(0);  // token_embd
    global(1);  // token_embd_norm.weight
    global(2);  // token_embd_norm.bias
    for (int l = 0; l < info_.n_layer; ++l) {
      const std::string blk = "blk." + std::to_string(l) + ".";
      const std::string blocks = "blocks." + std::to_string(l) + ".";
      for (const NameMap& m : spec.layer_names) {
        std::string canonical = blocks + std::string(m.canonical);
        if ((m.flags & gguf::kNotLayer0) && l == 0) {
          // llama.cpp wants the tensor in layer 0 too, though unused there: its converter
          // writes a copy of the stand-in.
          canonical = blocks + std::string(m.layer0_stand_in);
        }
        const Tensor* t = wf_.Find(canonical);
        if (!t) {
          if (m.flags & gguf::kOptional) continue;
          Fail("missing tensor '" + canonical + "'");
        }
        const bool vector = m.role == Role::kVector;
        Add(blk + std::string(m.gguf), m.role, {t},
            vector ? VectorShape(m, *t) : std::vector<int64_t>{});
      }
      if (!spec.fused_mixes.slots.empty()) {
        std::vector<const Tensor*> slots;
        for (std::string_view s : spec.fused_mixes.slots) {
          slots.push_back(&Get(blocks + std::string(s)));
        }
        const int64_t rows = static_cast<int64_t>(slots.size());
        Add(blk + std::string(spec.fused_mixes.gguf), Role::kVector, slots, {C(), 1, 1, rows});
      }
    }
    global(3);  // output_norm.weight
    global(4);  // output_norm.bias
    global(5);  // output
    return std::move(out_);
  }

  [[noreturn]] void Fail(const std::string& problem) const {
    throw Error(wf_.path + ": " + problem);
  }

 private:
  int64_t C() const { return info_.n_embd; }

  const Tensor& Get(const std::string& name) const {
    const Tensor* t = wf_.Find(name);
    if (!t) Fail("missing tensor '" + name + "'");
    return *t;
  }

  // The GGUF shape of a layer's vector-like tensor (docs/GGUF.md).
  std::vector<int64_t> VectorShape(const NameMap& m, const Tensor& t) const {
    const int64_t n = t.numel();
    if (m.stacked_rows > 0) return {C(), 1, 1, n / C()};
    if ((m.flags & gguf::kHeadRowsInGguf) && n == C()) return {info_.head_size, info_.n_head};
    return {n};
  }

  void Add(const std::string& name, Role role, std::vector<const Tensor*> pieces,
           std::vector<int64_t> ne = {}) {
    if (name.size() > gguf::kMaxTensorName) Fail("tensor name '" + name + "' is too long for GGUF");
    OutTensor o;
    o.name = name;
    o.role = role;
    o.pieces = std::move(pieces);
    const Tensor& first = *o.pieces.front();
    if (ne.empty()) {
      ne = role == Role::kVector ? std::vector<int64_t>{first.numel()} : ReversedShape(first);
    }
    o.ne = std::move(ne);
    int64_t total = 0;
    for (const Tensor* p : o.pieces) {
      if (p->numel() % o.ne[0] != 0 ||
          (IsQuantized(p->type) && o.ne[0] % Traits(p->type).block_elems != 0)) {
        Fail("tensor '" + p->name + "' does not split into rows of " + std::to_string(o.ne[0]) +
             " for '" + name + "'");
      }
      total += p->numel();
    }
    if (total != o.numel()) Fail("tensor '" + name + "': element count mismatch");
    o.type = ChooseType(role, first.type, options_.type, o.ne[0]);
    if (o.ne[0] % Traits(o.type).block_elems != 0) o.type = DType::kF32;  // cannot block it
    o.nbytes = StorageBytes(o.type, o.numel());
    out_.push_back(std::move(o));
  }

  const WeightFile& wf_;
  const ModelInfo& info_;
  const GgufWriteOptions& options_;
  std::vector<OutTensor> out_;
};

// ---- Metadata serialisation ----

class Meta {
 public:
  void Raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  template <typename T>
  void Pod(T v) {
    Raw(&v, sizeof v);
  }
  void Str(std::string_view s) {
    Pod<uint64_t>(s.size());
    Raw(s.data(), s.size());
  }
  void Key(std::string_view key, ValueType type) {
    Str(key);
    Pod<uint32_t>(static_cast<uint32_t>(type));
    ++count_;
  }
  void U32(std::string_view key, uint32_t v) {
    Key(key, ValueType::kU32);
    Pod(v);
  }
  void F32(std::string_view key, float v) {
    Key(key, ValueType::kF32);
    Pod(v);
  }
  void String(std::string_view key, std::string_view v) {
    Key(key, ValueType::kString);
    Str(v);
  }
  void StringArray(std::string_view key, const std::vector<std::string>& v) {
    Key(key, ValueType::kArray);
    Pod<uint32_t>(static_cast<uint32_t>(ValueType::kString));
    Pod<uint64_t>(v.size());
    for (const std::string& s : v) Str(s);
  }
  void I32Array(std::string_view key, const std::vector<int32_t>& v) {
    Key(key, ValueType::kArray);
    Pod<uint32_t>(static_cast<uint32_t>(ValueType::kI32));
    Pod<uint64_t>(v.size());
    Raw(v.data(), v.size() * 4);
  }
  std::vector<uint8_t>& bytes() { return bytes_; }
  uint64_t count() const { return count_; }

 private:
  std::vector<uint8_t> bytes_;
  uint64_t count_ = 0;
};

// Low-rank sizes llama.cpp's rwkv6/rwkv7 need as keys: one per kind, the same in every layer.
uint32_t UniformRank(const WeightFile& wf, const ModelInfo& info, const char* suffix,
                     int first_layer, int64_t divisor = 1) {
  int64_t rank = -1;
  for (int l = first_layer; l < info.n_layer; ++l) {
    const std::string name = "blocks." + std::to_string(l) + "." + suffix;
    const Tensor* t = wf.Find(name);
    if (!t) throw Error(wf.path + ": missing tensor '" + name + "'");
    const int64_t r = t->rows() / divisor;
    if (rank >= 0 && r != rank) {
      throw Error(wf.path + ": '" + name + "' has rank " + std::to_string(r) + " but layer " +
                  std::to_string(first_layer) + " has " + std::to_string(rank) + "; llama.cpp's " +
                  std::string(Version(info.arch).gguf.architecture) +
                  " needs the same rank in every layer");
    }
    rank = r;
  }
  return static_cast<uint32_t>(rank);
}

bool LooksSpecial(std::string_view t) {
  return t.size() > 4 && t.substr(0, 2) == "<|" && t.substr(t.size() - 2) == "|>";
}

// tokenizer.ggml.* as llama.cpp's converter writes them (docs/GGUF.md, "Tokenizer").
void WriteTokenizer(Meta& m, const TokenizerData& tok, int n_vocab, const std::string& path) {
  if (tok.tokens.size() > static_cast<size_t>(n_vocab)) {
    for (size_t i = n_vocab; i < tok.tokens.size(); ++i) {
      if (!tok.tokens[i].empty()) {
        throw Error(path + ": the tokenizer has " + std::to_string(tok.tokens.size()) +
                    " tokens but the model's vocabulary only " + std::to_string(n_vocab));
      }
    }
  }
  const bool bpe = tok.kind == "gpt2-bpe";
  if (!bpe && tok.kind != "world" && tok.kind != "bytes") {
    throw Error(path + ": cannot store a '" + tok.kind + "' tokenizer in GGUF");
  }
  std::vector<bool> added(n_vocab, false);
  if (bpe) {
    for (int32_t id : tok.added_tokens) {
      if (id < 0 || id >= n_vocab || static_cast<size_t>(id) >= tok.tokens.size()) {
        throw Error(path + ": tokenizer added token id " + std::to_string(id) +
                    " is outside the vocabulary");
      }
      added[id] = true;
    }
  }
  std::vector<std::string> tokens(n_vocab);
  std::vector<int32_t> types(n_vocab, gguf::kTokenNormal);
  std::set<std::string, std::less<>> seen;  // GGUF token texts must be unique
  for (int i = 0; i < n_vocab; ++i) {
    const std::string_view t = i < static_cast<int>(tok.tokens.size())
                                   ? std::string_view(tok.tokens[i])
                                   : std::string_view();
    if (t.empty()) {
      // World id 0 is the end-of-text token llama.cpp calls "<s>"; the rest is padding.
      const bool eot = i == 0 && !bpe;
      tokens[i] = eot ? "<s>" : "[PAD" + std::to_string(i) + "]";
      types[i] = eot ? gguf::kTokenControl : gguf::kTokenUnused;
    } else if (added[i]) {
      // Added tokens are stored as plain text: special-looking ones as control tokens, the
      // rest (GPT-NeoX's runs of spaces) as user-defined ones, which llama.cpp matches in text.
      tokens[i] = std::string(t);
      types[i] = LooksSpecial(t) ? gguf::kTokenControl : gguf::kTokenUserDefined;
    } else {
      tokens[i] = bpe ? gguf::ByteLevelEncode(t) : gguf::EscapeRwkvToken(t);
    }
    if (!seen.insert(tokens[i]).second) {
      throw Error(path + ": tokenizer token " + std::to_string(i) + " ('" +
                  tokens[i].substr(0, 40) + "') appears twice in GGUF's encoding");
    }
  }
  m.String("tokenizer.ggml.model", bpe ? "gpt2" : "rwkv");
  if (bpe) m.String("tokenizer.ggml.pre", "gpt-2");
  m.StringArray("tokenizer.ggml.tokens", tokens);
  m.I32Array("tokenizer.ggml.token_type", types);
  if (bpe) m.StringArray("tokenizer.ggml.merges", tok.merges);
  if (tok.kind == "world" || (bpe && types[0] == gguf::kTokenControl)) {
    m.U32("tokenizer.ggml.bos_token_id", 0);
    m.U32("tokenizer.ggml.eos_token_id", 0);
  }
  // llama.cpp's converter marks World's "\n\n" (261) as end of turn so that chat stops.
  if (tok.kind == "world" && tok.tokens.size() > 261 && tok.tokens[261] == "\n\n") {
    m.U32("tokenizer.ggml.eot_token_id", 261);
  }
  if (bpe && !tok.normalizer.empty()) m.String(gguf::kKeyTokenizerNormalizer, tok.normalizer);
}

// A version's own keys, written under "<architecture>.".
class ArchKeys final : public gguf::KeyWriter {
 public:
  ArchKeys(Meta& m, const WeightFile& wf, const ModelInfo& info, std::string prefix)
      : m_(m), wf_(wf), info_(info), prefix_(std::move(prefix)) {}
  const ModelInfo& info() const override { return info_; }
  void U32(std::string_view key, uint32_t value) override {
    m_.U32(prefix_ + std::string(key), value);
  }
  void F32(std::string_view key, float value) override {
    m_.F32(prefix_ + std::string(key), value);
  }
  uint32_t UniformRank(const char* suffix, int first_layer, int64_t divisor) const override {
    return aviary::UniformRank(wf_, info_, suffix, first_layer, divisor);
  }

 private:
  Meta& m_;
  const WeightFile& wf_;
  const ModelInfo& info_;
  std::string prefix_;
};

void WriteMetadata(Meta& m, const WeightFile& wf, const ModelInfo& info, DType main_type,
                   const GgufWriteOptions& options) {
  const GgufVersion& spec = Version(info.arch).gguf;
  const std::string a(spec.architecture);
  m.String("general.architecture", a);
  m.U32("general.file_type", gguf::FileTypeOf(main_type));
  m.U32("general.quantization_version", 2);
  m.String(gguf::kKeyRwkvVersion, spec.rwkv_version);
  m.U32(a + ".context_length", 1048576);  // RWKV has no context limit; llama.cpp wants a value
  m.U32(a + ".embedding_length", info.n_embd);
  m.U32(a + ".block_count", info.n_layer);
  m.U32(a + ".feed_forward_length", info.n_ffn);
  m.F32(a + ".attention.layer_norm_epsilon", 1e-5f);
  ArchKeys keys(m, wf, info, a + ".");
  spec.write_keys(keys);
  if (options.tokenizer) WriteTokenizer(m, *options.tokenizer, info.n_vocab, wf.path);
}

class OutFile {
 public:
  explicit OutFile(const std::string& path) : path_(path) {
    f_ = std::fopen(path.c_str(), "wb");
    if (!f_) throw Error(path + ": cannot create: " + std::strerror(errno));
    std::setvbuf(f_, nullptr, _IOFBF, 1 << 20);
  }
  ~OutFile() {
    if (f_) std::fclose(f_);
  }
  void Write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f_) != n) Fail();
    written_ += n;
  }
  void PadTo(uint64_t alignment) {
    static const uint8_t kZeros[64] = {};
    while (written_ % alignment != 0) {
      Write(kZeros, std::min<uint64_t>(sizeof kZeros, alignment - written_ % alignment));
    }
  }
  void Close() {
    const int rc = std::fclose(f_);
    f_ = nullptr;
    if (rc != 0) Fail();
  }
  uint64_t written() const { return written_; }

 private:
  [[noreturn]] void Fail() { throw Error(path_ + ": write failed: " + std::strerror(errno)); }
  std::string path_;
  FILE* f_ = nullptr;
  uint64_t written_ = 0;
};

std::vector<OutTensor> PlanAll(const WeightFile& wf, const ModelInfo& info,
                               const GgufWriteOptions& options) {
  if (!FindVersion(info.arch)) throw Error(wf.path + ": unknown architecture");
  return Planner(wf, info, options).Plan();
}

}  // namespace

std::vector<GgufPlanEntry> PlanGguf(const WeightFile& wf, const ModelInfo& info,
                                    const GgufWriteOptions& options) {
  std::vector<GgufPlanEntry> plan;
  for (const OutTensor& t : PlanAll(wf, info, options)) plan.push_back({t.name, t.type, t.ne});
  return plan;
}

GgufWriteReport WriteGguf(const WeightFile& wf, const ModelInfo& info,
                          const GgufWriteOptions& options, const std::string& path) {
  std::vector<OutTensor> tensors = PlanAll(wf, info, options);
  GgufWriteReport report;
  report.architecture = std::string(Version(info.arch).gguf.architecture);

  DType main_type = DType::kF32;
  int dequantized = 0, requantized = 0;
  for (const OutTensor& t : tensors) {
    if (t.name == "blk.0.time_mix_key.weight") main_type = t.type;
    for (const Tensor* p : t.pieces) {
      if (p->type == t.type) continue;
      if (IsQuantized(p->type) && IsQuantized(t.type)) ++requantized;
      else if (IsQuantized(p->type)) ++dequantized;
    }
  }
  // Counted per distinct source tensor: v7's layer-0 v copies reuse a0..a2.
  for (const auto& [name, t] : wf.tensors) {
    report.types_in[std::string(DTypeName(t.type))]++;
    report.tensor_bytes_in += t.nbytes;
  }

  Meta meta;
  WriteMetadata(meta, wf, info, main_type, options);
  // Tensor infos, with offsets computed up front.
  uint64_t offset = 0;
  Meta infos;
  for (OutTensor& t : tensors) {
    t.offset = offset;
    offset += (t.nbytes + gguf::kDefaultAlignment - 1) / gguf::kDefaultAlignment *
              gguf::kDefaultAlignment;
    infos.Str(t.name);
    infos.Pod<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) infos.Pod<uint64_t>(static_cast<uint64_t>(d));
    infos.Pod<uint32_t>(gguf::GgmlTypeOf(t.type));
    infos.Pod<uint64_t>(t.offset);
    report.types_out[std::string(DTypeName(t.type))]++;
    report.tensor_bytes_out += t.nbytes;
  }

  OutFile out(path);
  out.Write(gguf::kMagic, 4);
  const uint32_t version = gguf::kVersion;
  const uint64_t n_tensors = tensors.size(), n_kv = meta.count();
  out.Write(&version, 4);
  out.Write(&n_tensors, 8);
  out.Write(&n_kv, 8);
  out.Write(meta.bytes().data(), meta.bytes().size());
  out.Write(infos.bytes().data(), infos.bytes().size());
  meta = Meta();
  infos = Meta();
  out.PadTo(gguf::kDefaultAlignment);
  const uint64_t data_start = out.written();

  std::vector<uint8_t> batch;
  constexpr int64_t kBatchRows = 256;  // rows converted (in parallel) per write
  for (const OutTensor& t : tensors) {
    if (out.written() != data_start + t.offset)
      throw Error(path + ": internal error: offset mismatch");
    const int64_t cols = t.ne[0];
    const size_t out_row = StorageBytes(t.type, cols);
    for (const Tensor* p : t.pieces) {
      const int64_t rows = p->numel() / cols;
      const size_t in_row = StorageBytes(p->type, cols);
      if (p->type == t.type) {  // same type: the stored bytes, unchanged
        out.Write(p->data, in_row * rows);
        continue;
      }
      // The K-quant encoders search scales: spread the rows over the thread pool. Each row's
      // bytes depend only on the row, so the file is the same for any thread count.
      for (int64_t r0 = 0; r0 < rows; r0 += kBatchRows) {
        const int64_t n = std::min(kBatchRows, rows - r0);
        batch.resize(static_cast<size_t>(n) * out_row);
        ParallelFor(n, [&](int64_t i, int) {
          thread_local std::vector<float> row_f32;
          row_f32.resize(static_cast<size_t>(cols));
          DequantizeRow(p->type, p->data + (r0 + i) * in_row, row_f32.data(), cols);
          QuantizeRow(t.type, row_f32.data(), batch.data() + i * out_row, cols);
        });
        out.Write(batch.data(), batch.size());
      }
    }
    out.PadTo(gguf::kDefaultAlignment);
  }
  report.file_bytes = out.written();
  report.tensors_out = static_cast<int>(tensors.size());
  out.Close();
  if (dequantized) {
    report.notes.push_back("dequantized " + std::to_string(dequantized) +
                           " block-quantized tensor(s) (exact)");
  }
  if (requantized) {
    report.notes.push_back("re-quantized " + std::to_string(requantized) +
                           " already-quantized tensor(s): the error adds up; quantize from the "
                           "F32/F16 model for the best quality");
  }
  if (!options.tokenizer) {
    report.notes.push_back(
        "no tokenizer embedded: llama.cpp cannot load the file; aviary needs "
        "--tokenizer");
  }
  return report;
}

}  // namespace aviary
