#include "models/synth.h"

#include <cmath>
#include <functional>

#include "aviary/error.h"
#include "formats/rwkvcpp_writer.h"
#include "models/versions.h"
#include "tensor/thread_pool.h"

namespace aviary {
namespace {

using Init = SynthInit;

struct Spec {
  SynthTensor tensor;
  Init init;
};

// rwkv.cpp's converter: which tensors an FP16 file keeps in F32 (convert_pytorch_to_ggml.py).
bool ConverterKeepsF32(const std::string& name, size_t dims) {
  if (dims < 2) return true;
  for (const char* s :
       {".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0"}) {
    if (name.find(s) != std::string::npos) return true;
  }
  return false;
}

// rwkv.cpp's quantizer: which 2-D tensors it quantizes (rwkv_tensor_needs_quant).
bool QuantizerQuantizes(const std::string& name) {
  if (name == "emb.weight" || name == "head.weight") return false;
  for (const char* s : {"att.v1", "att.v2", "att.g1", "att.g2", "att.a1", "att.a2", "att.w1",
                        "att.w2", "att.r_k"}) {
    if (name.find(s) != std::string::npos) return false;
  }
  return true;
}

DType StoredType(const SynthOptions& o, const std::string& name,
                 const std::vector<int64_t>& shape) {
  if (o.type == DType::kF32) return DType::kF32;
  const DType converted = ConverterKeepsF32(name, shape.size()) ? DType::kF32 : DType::kF16;
  if (o.type == DType::kF16 || !IsQuantized(o.type)) return converted;
  if (shape.size() == 2 && QuantizerQuantizes(name) && shape.back() % kQBlock == 0) {
    return o.type;
  }
  return converted;
}

int DefaultFfn(const SynthOptions& o) {
  return static_cast<int>(static_cast<int64_t>(o.n_embd * Version(o.arch).ffn_ratio) / 32 * 32);
}

std::vector<Spec> Specs(const SynthOptions& o) {
  const int64_t C = o.n_embd, V = o.n_vocab, L = o.n_layer;
  const int64_t F = o.n_ffn > 0 ? o.n_ffn : DefaultFfn(o);
  const VersionSpec& version = Version(o.arch);
  const int64_t N = version.heads_from.empty() ? C : o.head_size, H = C / N;
  const float sc = 1.0f / std::sqrt(static_cast<float>(C));
  const float sf = 1.0f / std::sqrt(static_cast<float>(F));
  std::vector<Spec> specs;
  auto add = [&](std::string name, std::vector<int64_t> shape, Init init) {
    specs.push_back({{std::move(name), std::move(shape), DType::kF32}, init});
  };
  const Init ln_w = Normal(1.0f, 0.05f), ln_b = Normal(0.0f, 0.02f), mix = Uniform(0.0f, 1.0f);
  const Init proj = Normal(0.0f, sc), out_proj = Normal(0.0f, 0.5f * sc);

  add("emb.weight", {V, C}, Normal(0.0f, 1.0f));
  for (int64_t l = 0; l < L; ++l) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    add(b + "ln1.weight", {C}, ln_w);
    add(b + "ln1.bias", {C}, ln_b);
    add(b + "ln2.weight", {C}, ln_w);
    add(b + "ln2.bias", {C}, ln_b);
    if (l == 0) {
      add(b + "ln0.weight", {C}, ln_w);
      add(b + "ln0.bias", {C}, ln_b);
    }
    SynthLayer layer;
    layer.layer = l;
    layer.C = C;
    layer.H = H;
    layer.N = N;
    layer.proj = proj;
    layer.out_proj = out_proj;
    layer.mix = mix;
    layer.ln_w = ln_w;
    layer.ln_b = ln_b;
    layer.add = [&](std::string_view name, std::vector<int64_t> shape, Init init) {
      add(b + std::string(name), std::move(shape), init);
    };
    version.synth_layer(layer);
    add(b + "ffn.key.weight", {F, C}, proj);
    if (version.gated_channel_mix) add(b + "ffn.receptance.weight", {C, C}, proj);
    add(b + "ffn.value.weight", {C, F}, Normal(0.0f, 0.5f * sf));
  }
  add("ln_out.weight", {C}, ln_w);
  add("ln_out.bias", {C}, ln_b);
  add("head.weight", {V, C}, Normal(0.0f, 2.5f * sc));
  for (Spec& s : specs) s.tensor.type = StoredType(o, s.tensor.name, s.tensor.shape);
  return specs;
}

void Validate(const SynthOptions& o) {
  auto fail = [](const std::string& m) { throw UsageError("synth: " + m); };
  if (o.n_layer < 1 || o.n_layer > 1024) fail("--layers must be 1..1024");
  if (o.n_embd < 32 || o.n_embd > (1 << 16) || o.n_embd % 32 != 0) {
    fail("--embd must be a multiple of 32 in 32..65536");
  }
  if (o.n_vocab < 1 || o.n_vocab > (1 << 22)) fail("--vocab must be 1..4194304");
  if (!Version(o.arch).heads_from.empty() && (o.head_size < 1 || o.n_embd % o.head_size != 0)) {
    fail("--embd " + std::to_string(o.n_embd) + " is not a multiple of the head size " +
         std::to_string(o.head_size));
  }
  if (o.n_ffn < 0 || o.n_ffn % 32 != 0) fail("--ffn must be a multiple of 32");
  if (o.type == DType::kBF16) fail("rwkv.cpp's format has no BF16; use F16 or F32");
}

// splitmix64: seeds and per-row streams.
inline uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t HashName(const std::string& s, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ull ^ Mix(seed);
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return Mix(h);
}

// Fills one row: uniform from a 64-bit LCG-free xorshift stream; normal approximated by the
// sum of four uniforms (Irwin-Hall, scaled to unit variance), plenty for random weights.
void FillRow(const Init& init, uint64_t stream, int64_t n, float* out) {
  uint64_t s = stream | 1;
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<float>(s >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  };
  for (int64_t i = 0; i < n; ++i) {
    float v;
    if (init.dist == Init::kUniform) {
      v = init.a + (init.b - init.a) * next();
    } else {
      const float z = (next() + next() + next() + next() - 2.0f) * 1.7320508f;
      v = init.a + init.b * z;
    }
    switch (init.post) {
      case Init::kNone: break;
      case Init::kNegExp: v = -std::exp(v); break;
      case Init::kExpNegExp: v = std::exp(-std::exp(v)); break;
      case Init::kExp: v = std::exp(v); break;
    }
    out[i] = v;
  }
}

}  // namespace

Arch ParseArch(const std::string& version) {
  if (const VersionSpec* v = FindVersionByName(version)) return v->arch;
  std::string expected;
  const std::span<const VersionSpec> all = Versions();
  for (size_t i = all.size(); i-- > 0;) {  // oldest first
    expected += all[i].aliases.front();
    expected += i == 1 ? " or " : i > 1 ? ", " : "";
  }
  throw UsageError("unknown RWKV version '" + version + "' (expected " + expected + ")");
}

std::vector<SynthTensor> PlanSynthModel(const SynthOptions& options) {
  Validate(options);
  std::vector<SynthTensor> out;
  for (Spec& s : Specs(options)) out.push_back(std::move(s.tensor));
  return out;
}

SynthReport WriteSynthModel(const SynthOptions& options, const std::string& path) {
  Validate(options);
  const std::vector<Spec> specs = Specs(options);
  const DType header_type = options.type == DType::kF32 ? DType::kF32 : options.type;
  RwkvCppWriter writer(path, options.n_vocab, options.n_embd, options.n_layer, header_type);
  SynthReport report;
  for (const Spec& s : specs) {
    const uint64_t stream = HashName(s.tensor.name, options.seed);
    const int64_t cols = s.tensor.shape.back();
    int64_t numel = 1;
    for (int64_t d : s.tensor.shape) numel *= d;
    report.n_params += static_cast<uint64_t>(numel);
    writer.AddTensor(
        s.tensor.name, s.tensor.shape, s.tensor.type, [&](int64_t row0, int64_t n, float* out) {
          ParallelFor(n, [&](int64_t r, int) {
            FillRow(s.init, Mix(stream + static_cast<uint64_t>(row0 + r)), cols, out + r * cols);
          });
        });
  }
  report.tensors = writer.tensors();
  report.types = writer.type_counts();
  report.file_bytes = writer.Finish();
  return report;
}

}  // namespace aviary
