#include "models/synth.h"

#include <cmath>
#include <functional>

#include "aviary/error.h"
#include "formats/rwkvcpp_writer.h"
#include "tensor/thread_pool.h"

namespace aviary {
namespace {

// How a tensor's values are drawn, then transformed into rwkv.cpp's prepared form.
struct Init {
  enum Dist { kNormal, kUniform } dist = kNormal;
  float a = 0, b = 0;  // normal: mean a, std b; uniform: [a, b)
  enum Post { kNone, kNegExp, kExpNegExp, kExp } post = kNone;
};

Init Normal(float mean, float std) { return {Init::kNormal, mean, std, Init::kNone}; }
Init Uniform(float lo, float hi, Init::Post post = Init::kNone) {
  return {Init::kUniform, lo, hi, post};
}

struct Spec {
  SynthTensor tensor;
  Init init;
};

// rwkv.cpp's converter: which tensors an FP16 file keeps in F32 (convert_pytorch_to_ggml.py).
bool ConverterKeepsF32(const std::string& name, size_t dims) {
  if (dims < 2) return true;
  for (const char* s : {".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0"}) {
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

// BlinkDL's low-rank sizes: max(32, round(scale * C^power / 32) * 32).
int64_t Lora(int C, double scale, double power) {
  const double v = std::round(scale * std::pow(static_cast<double>(C), power) / 32.0) * 32.0;
  return std::max<int64_t>(32, static_cast<int64_t>(v));
}

int DefaultFfn(const SynthOptions& o) {
  if (o.arch == Arch::kV5_2 || o.arch == Arch::kV6) {
    return static_cast<int>(static_cast<int64_t>(o.n_embd * 3.5) / 32 * 32);
  }
  return 4 * o.n_embd;
}

std::vector<Spec> Specs(const SynthOptions& o) {
  const int64_t C = o.n_embd, V = o.n_vocab, L = o.n_layer;
  const int64_t F = o.n_ffn > 0 ? o.n_ffn : DefaultFfn(o);
  const int64_t N = o.arch == Arch::kV4 ? C : o.head_size, H = C / N;
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
    switch (o.arch) {
      case Arch::kV4:
      case Arch::kV5_1:
      case Arch::kV5_2: {
        const bool v52 = o.arch == Arch::kV5_2;
        add(b + "att.time_mix_k", {C}, mix);
        add(b + "att.time_mix_v", {C}, mix);
        add(b + "att.time_mix_r", {C}, mix);
        if (v52) add(b + "att.time_mix_g", {C}, mix);
        if (o.arch == Arch::kV4) {
          add(b + "att.time_decay", {C}, Uniform(-5.0f, 2.0f, Init::kNegExp));  // -exp(w)
          add(b + "att.time_first", {C}, Uniform(-1.0f, 1.0f));
        } else if (v52) {
          add(b + "att.time_decay", {H, N, 1}, Uniform(-6.0f, -1.0f, Init::kExpNegExp));
          add(b + "att.time_faaaa", {H, N, 1}, Normal(0.0f, 0.3f));
        } else {
          add(b + "att.time_decay", {H, 1, 1}, Uniform(-6.0f, -1.0f, Init::kExpNegExp));
          add(b + "att.time_first", {H, 1, 1}, Uniform(-1.0f, 0.5f, Init::kExp));
        }
        add(b + "att.key.weight", {C, C}, proj);
        add(b + "att.value.weight", {C, C}, proj);
        add(b + "att.receptance.weight", {C, C}, proj);
        if (v52) add(b + "att.gate.weight", {C, C}, proj);
        add(b + "att.output.weight", {C, C}, out_proj);
        if (o.arch != Arch::kV4) {
          add(b + "att.ln_x.weight", {C}, ln_w);
          add(b + "att.ln_x.bias", {C}, ln_b);
        }
        add(b + "ffn.time_mix_k", {C}, mix);
        add(b + "ffn.time_mix_r", {C}, mix);
        break;
      }
      case Arch::kV6: {
        const int64_t D = C >= 4096 ? 64 : 32, Dd = C >= 4096 ? 128 : 64;
        for (const char* s : {"x", "w", "k", "v", "r", "g"}) add(b + "att.time_maa_" + s, {C}, mix);
        add(b + "att.time_maa_w1", {5 * D, C}, Normal(0.0f, 0.5f * sc));
        add(b + "att.time_maa_w2", {5, C, D}, Normal(0.0f, 0.1f / std::sqrt(static_cast<float>(D))));
        add(b + "att.time_decay", {H, N, 1}, Uniform(-6.0f, -1.0f));
        add(b + "att.time_decay_w1", {Dd, C}, Normal(0.0f, 0.5f * sc));
        add(b + "att.time_decay_w2", {C, Dd}, Normal(0.0f, 0.1f / std::sqrt(static_cast<float>(Dd))));
        add(b + "att.time_faaaa", {H, N, 1}, Normal(0.0f, 0.3f));
        add(b + "att.receptance.weight", {C, C}, proj);
        add(b + "att.key.weight", {C, C}, proj);
        add(b + "att.value.weight", {C, C}, proj);
        add(b + "att.output.weight", {C, C}, out_proj);
        add(b + "att.gate.weight", {C, C}, proj);
        add(b + "att.ln_x.weight", {C}, ln_w);
        add(b + "att.ln_x.bias", {C}, ln_b);
        add(b + "ffn.time_maa_k", {C}, mix);
        add(b + "ffn.time_maa_r", {C}, mix);
        break;
      }
      case Arch::kV7: {
        const int64_t Dw = Lora(static_cast<int>(C), 1.8, 0.5), Da = Dw;
        const int64_t Dv = Lora(static_cast<int>(C), 1.3, 0.5), Dg = Lora(static_cast<int>(C), 0.6, 0.8);
        auto lora_in = [&](int64_t, float gain) { return Normal(0.0f, gain * sc); };
        auto lora_out = [&](int64_t D, float gain) {
          return Normal(0.0f, gain / std::sqrt(static_cast<float>(D)));
        };
        add(b + "att.x_rwkvag", {6, 1, C}, mix);
        add(b + "att.w1", {Dw, C}, lora_in(Dw, 0.5f));
        add(b + "att.w2", {C, Dw}, lora_out(Dw, 0.1f));
        add(b + "att.w0", {1, 1, C}, Uniform(-6.5f, -1.5f));
        add(b + "att.a1", {Da, C}, lora_in(Da, 0.5f));
        add(b + "att.a2", {C, Da}, lora_out(Da, 0.2f));
        add(b + "att.a0", {1, 1, C}, Normal(0.0f, 0.3f));
        if (l > 0) {
          add(b + "att.v1", {Dv, C}, lora_in(Dv, 0.5f));
          add(b + "att.v2", {C, Dv}, lora_out(Dv, 0.2f));
          add(b + "att.v0", {1, 1, C}, Normal(1.0f, 0.2f));
        }
        add(b + "att.g1", {Dg, C}, lora_in(Dg, 1.0f));
        add(b + "att.g2", {C, Dg}, lora_out(Dg, 1.0f));
        add(b + "att.k_k", {1, 1, C}, Normal(0.85f, 0.05f));
        add(b + "att.k_a", {1, 1, C}, Normal(1.0f, 0.05f));
        add(b + "att.r_k", {H, N}, Normal(0.0f, 0.3f));
        add(b + "att.receptance.weight", {C, C}, proj);
        add(b + "att.key.weight", {C, C}, proj);
        add(b + "att.value.weight", {C, C}, proj);
        add(b + "att.output.weight", {C, C}, out_proj);
        add(b + "att.ln_x.weight", {C}, ln_w);
        add(b + "att.ln_x.bias", {C}, ln_b);
        add(b + "ffn.x_k", {1, 1, C}, mix);
        break;
      }
    }
    add(b + "ffn.key.weight", {F, C}, proj);
    if (o.arch != Arch::kV7) add(b + "ffn.receptance.weight", {C, C}, proj);
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
  if (o.arch != Arch::kV4 && (o.head_size < 1 || o.n_embd % o.head_size != 0)) {
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
  std::string v = version;
  if (!v.empty() && (v[0] == 'v' || v[0] == 'V')) v.erase(0, 1);
  if (v == "4" || v == "4.0") return Arch::kV4;
  if (v == "5.1") return Arch::kV5_1;
  if (v == "5" || v == "5.2") return Arch::kV5_2;
  if (v == "6" || v == "6.0") return Arch::kV6;
  if (v == "7" || v == "7.0") return Arch::kV7;
  throw UsageError("unknown RWKV version '" + version + "' (expected 4, 5.1, 5.2, 6 or 7)");
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
    writer.AddTensor(s.tensor.name, s.tensor.shape, s.tensor.type,
                     [&](int64_t row0, int64_t n, float* out) {
                       ParallelFor(n, [&](int64_t r, int) {
                         FillRow(s.init, Mix(stream + static_cast<uint64_t>(row0 + r)), cols,
                                 out + r * cols);
                       });
                     });
  }
  report.tensors = writer.tensors();
  report.types = writer.type_counts();
  report.file_bytes = writer.Finish();
  return report;
}

}  // namespace aviary
