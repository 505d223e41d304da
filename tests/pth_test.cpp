// PyTorch .pth and safetensors checkpoints, read directly (src/formats/{zip,pickle,pth,
// safetensors,blinkdl}.cpp):
//  - the shared tiny checkpoints (torch.save / safetensors, BlinkDL's raw names and values)
//    give their expected logits, and the same as rwkv.cpp's converted .bin files;
//  - every architecture's conversion, by turning the stress .bin files back into BlinkDL's raw
//    layout (and into Hugging Face names) and checking the exact logits again;
//  - a generated random RWKV-7 (the same generator as the manual 0.4B measurement) against an
//    independent float64 implementation of BlinkDL's reference math on the raw tensors;
//  - hostile inputs: refused pickles (os.system, eval, unknown opcodes), truncated and lying
//    zips and pickles, impossible tensors, broken safetensors headers. Every one must be an
//    aviary::Error starting with the file name: no crash, hang or absurd allocation (run this
//    under -DAVIARY_SANITIZE=ON too).
// Buffers handed to the loaders are exactly as long as the file, so ASan sees any over-read.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/gguf_writer.h"
#include "formats/weight_file.h"
#include "pth_fixtures.h"
#include "test_data.h"

namespace aviary {
namespace {

using testing::ExpectedPrompt;
using testing::ReadFileBytes;
using testing::ReadFloats;
using testing::SharedPath;
using namespace testing::pth;

// ---- helpers ----

std::vector<float> Logits(const Model& model, const std::vector<int32_t>& tokens) {
  State state = model.NewState();
  std::vector<float> logits;
  for (int32_t t : tokens) model.Eval(std::span<const int32_t>(&t, 1), state, &logits);
  return logits;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (!(d <= m)) m = d;  // NaN propagates
  }
  return m;
}

std::unique_ptr<Model> LoadBytes(const Bytes& bytes, const std::string& name) {
  return Model::LoadFromMemory(std::span<const uint8_t>(bytes.data(), bytes.size()), name);
}

// Loading must fail with an aviary::Error that starts with "<name>: " and contains `needle`.
::testing::AssertionResult Refused(const Bytes& bytes, const std::string& name,
                                   const std::string& needle = "") {
  const Bytes exact(bytes.begin(), bytes.end());  // exactly sized heap block for ASan
  try {
    LoadBytes(exact, name);
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.rfind(name + ": ", 0) != 0) {
      return ::testing::AssertionFailure() << "message does not start with the name: " << msg;
    }
    if (msg.find(needle) == std::string::npos) {
      return ::testing::AssertionFailure() << "message lacks '" << needle << "': " << msg;
    }
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "not an aviary::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "loaded without error";
}

// Loads or throws an aviary::Error starting with the name; anything else fails.
::testing::AssertionResult LoadsOrRefuses(const Bytes& bytes, const std::string& name) {
  try {
    auto model = LoadBytes(bytes, name);
    std::vector<float> logits = Logits(*model, {0});
    if (logits.size() != static_cast<size_t>(model->info().n_vocab)) {
      return ::testing::AssertionFailure() << "wrong logits size";
    }
  } catch (const Error& e) {
    if (std::string(e.what()).rfind(name + ": ", 0) != 0) {
      return ::testing::AssertionFailure() << "message does not start with the name: " << e.what();
    }
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "not an aviary::Error: " << e.what();
  }
  return ::testing::AssertionSuccess();
}

const std::string kPthDir = "models/pth/";

// ---- the shared checkpoints ----

struct SharedCase {
  std::string file;
  Arch arch;
};

class SharedCheckpointTest : public ::testing::TestWithParam<SharedCase> {};

TEST_P(SharedCheckpointTest, LoadsAndMatchesExpectedLogits) {
  const SharedCase& c = GetParam();
  REQUIRE_SHARED(kPthDir + c.file);
  auto model = Model::Load(SharedPath(kPthDir + c.file));
  const ModelInfo& info = model->info();
  EXPECT_EQ(info.arch, c.arch);
  EXPECT_EQ(info.n_vocab, 256);
  EXPECT_EQ(info.n_embd, 64);
  EXPECT_EQ(info.n_layer, 12);
  EXPECT_FALSE(info.notes.empty());
  const bool pth = c.file.ends_with(".pth");
  EXPECT_EQ(info.format, pth ? "PyTorch .pth (zip, pickle)" : "safetensors");
  EXPECT_EQ(info.main_type, c.file.find("bf16") != std::string::npos ? "BF16" : "F32");
  const std::vector<float> expected =
      ReadFloats(SharedPath(kPthDir + "expected-logits-" + c.file + ".bin"));
  ASSERT_EQ(expected.size(), 256u);
  double diff = 0;
  {  // BF16 weights widened exactly, float products: as close as FP32
    aviary::testing::RoundedActivations exact(false);
    diff = MaxAbsDiff(Logits(*model, ExpectedPrompt()), expected);
  }
  // The default: bfloat16 products for BF16 matrices where the CPU has them (model_test's bound).
  const double rounded = MaxAbsDiff(Logits(*model, ExpectedPrompt()), expected);
  RecordProperty("max_abs_diff", std::to_string(diff));
  std::printf("  %s: max |logit - expected| = %.3g (default activations %.3g)\n", c.file.c_str(),
              diff, rounded);
  EXPECT_LE(diff, 1e-4);
  EXPECT_LE(rounded, 0.15);
}

INSTANTIATE_TEST_SUITE_P(
    Shared, SharedCheckpointTest,
    ::testing::Values(SharedCase{"tiny-rwkv-5v2-730K-fp32.pth", Arch::kV5_2},
                      SharedCase{"tiny-rwkv-5v2-730K-bf16.pth", Arch::kV5_2},
                      SharedCase{"tiny-rwkv-5v2-730K-fp32.safetensors", Arch::kV5_2},
                      SharedCase{"tiny-rwkv-5v2-730K-bf16.safetensors", Arch::kV5_2},
                      SharedCase{"tiny-rwkv-7v0-834K-fp32.pth", Arch::kV7},
                      SharedCase{"tiny-rwkv-7v0-834K-bf16.pth", Arch::kV7},
                      SharedCase{"tiny-rwkv-7v0-834K-fp32.safetensors", Arch::kV7},
                      SharedCase{"tiny-rwkv-7v0-834K-bf16.safetensors", Arch::kV7}),
    [](const auto& info) {
      std::string n = info.param.file;
      for (char& ch : n) {
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return n;
    });

// The .pth and the safetensors file of the same weights give bit-identical logits.
TEST(SharedCheckpoints, PthAndSafetensorsAgree) {
  for (const char* m : {"5v2-730K-fp32", "5v2-730K-bf16", "7v0-834K-fp32", "7v0-834K-bf16"}) {
    const std::string pth = kPthDir + "tiny-rwkv-" + m + ".pth";
    const std::string st = kPthDir + "tiny-rwkv-" + m + ".safetensors";
    REQUIRE_SHARED(pth);
    REQUIRE_SHARED(st);
    const auto a = Logits(*Model::Load(SharedPath(pth)), ExpectedPrompt());
    const auto b = Logits(*Model::Load(SharedPath(st)), ExpectedPrompt());
    EXPECT_EQ(a, b) << m;
  }
}

// The fp32 .pth against rwkv.cpp's FP32 .bin of the same model (converted by its Python
// script from the same checkpoint).
TEST(PthVsRwkvCpp, Fp32PthMatchesBin) {
  for (const char* m : {"5v2-730K", "7v0-834K"}) {
    const std::string pth = kPthDir + "tiny-rwkv-" + m + "-fp32.pth";
    const std::string bin = std::string("models/tiny-rwkv-") + m + "-FP32.bin";
    REQUIRE_SHARED(pth);
    REQUIRE_SHARED(bin);
    auto a = Model::Load(SharedPath(pth));
    auto b = Model::Load(SharedPath(bin));
    EXPECT_EQ(a->info().arch, b->info().arch);
    EXPECT_EQ(a->info().n_head, b->info().n_head);
    EXPECT_EQ(a->info().head_size, b->info().head_size);
    EXPECT_EQ(a->info().n_ffn, b->info().n_ffn);
    const double diff = MaxAbsDiff(Logits(*a, ExpectedPrompt()), Logits(*b, ExpectedPrompt()));
    std::printf("  %s: max |pth - rwkv.cpp bin| = %.3g\n", m, diff);
    EXPECT_LE(diff, 1e-5) << m;
  }
}

TEST(PthInfo, NotesDescribeTheConversion) {
  REQUIRE_SHARED(kPthDir + "tiny-rwkv-7v0-834K-bf16.pth");
  auto model = Model::Load(SharedPath(kPthDir + "tiny-rwkv-7v0-834K-bf16.pth"));
  std::string notes;
  for (const auto& n : model->info().notes) notes += n + "\n";
  EXPECT_NE(notes.find("x_rwkvag"), std::string::npos) << notes;
  // 12 layers x (w, a, g) pairs + 11 layers x the v pair (blocks.0 has none in this file).
  EXPECT_NE(notes.find("transposed 94 low-rank"), std::string::npos) << notes;
  // Big matrices stay BF16 views; the transposed a/v/g pairs stay BF16 too; only the stacked
  // mixes and the decay pair (F32 by GGUF's policy) are F32.
  const auto& types = model->info().tensor_types;
  ASSERT_TRUE(types.count("BF16"));
  ASSERT_TRUE(types.count("F32"));
  EXPECT_EQ(types.at("F32"), 12 + 12 * 2);  // x_rwkvag and w1/w2 per layer
}

// ---- every version: the stress .bin files turned back into raw checkpoints ----

// Inverse of the canonical transforms (what BlinkDL's checkpoint holds), computed in double.
enum class Names { kBlinkDl, kTransformers, kFla };

std::string ToTransformers(const std::string& n) {
  if (n == "head.weight") return n;
  std::string s = n;
  auto replace = [&](const std::string& from, const std::string& to) {
    const size_t p = s.find(from);
    if (p != std::string::npos) s.replace(p, from.size(), to);
  };
  if (s.rfind("emb.", 0) == 0) s = "embeddings." + s.substr(4);
  replace("blocks.0.ln0", "blocks.0.pre_ln");
  replace(".att.", ".attention.");
  replace(".ffn.", ".feed_forward.");
  for (const auto& [a, b] : {std::pair{".time_mix_k", ".time_mix_key"},
                             {".time_mix_v", ".time_mix_value"},
                             {".time_mix_r", ".time_mix_receptance"},
                             {".time_mix_g", ".time_mix_gate"}}) {
    if (s.ends_with(a)) s = s.substr(0, s.size() - std::strlen(a)) + b;
  }
  return "rwkv." + s;
}

// flash-linear-attention's names; `transposed` says the value must be stored transposed.
std::string ToFla(const std::string& n, bool* transposed) {
  *transposed = false;
  if (n == "emb.weight") return "model.embeddings.weight";
  if (n == "ln_out.weight") return "model.norm.weight";
  if (n == "ln_out.bias") return "model.norm.bias";
  if (n == "head.weight") return "lm_head.weight";
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= n.size(); ++i) {
    if (i == n.size() || n[i] == '.') {
      parts.push_back(n.substr(start, i - start));
      start = i + 1;
    }
  }
  std::map<std::string, std::string> part = {{"att", "attn"},
                                             {"ffn", "ffn"},
                                             {"ln0", "pre_norm"},
                                             {"ln1", "attn_norm"},
                                             {"ln2", "ffn_norm"}};
  parts[2] = part.at(parts[2]);
  if (parts[2] == "attn") {
    const std::string& p = parts[3];
    if (p.size() == 2 && std::string("wvag").find(p[0]) != std::string::npos &&
        std::string("012").find(p[1]) != std::string::npos) {
      const char* tail = p[1] == '0' ? "2.bias" : p[1] == '1' ? "0.weight" : "2.weight";
      *transposed = p[1] != '0';
      parts[3] = std::string(1, p[0]) + "_lora.lora." + tail;
    } else {
      std::map<std::string, std::string> proj = {{"receptance", "r_proj"},
                                                 {"key", "k_proj"},
                                                 {"value", "v_proj"},
                                                 {"output", "o_proj"},
                                                 {"ln_x", "g_norm"}};
      if (proj.count(p)) parts[3] = proj[p];
    }
  }
  std::string out = "model.layers";
  for (size_t i = 1; i < parts.size(); ++i) out += "." + parts[i];
  return out;
}

std::vector<float> TransposeF(const std::vector<float>& v, int64_t a, int64_t b) {
  std::vector<float> out(v.size());
  for (int64_t i = 0; i < a; ++i) {
    for (int64_t j = 0; j < b; ++j) out[j * a + i] = v[i * b + j];
  }
  return out;
}

std::vector<RawTensor> RawFromCanonical(const WeightFile& wf, Arch arch, Names names) {
  std::vector<RawTensor> out;
  const int64_t C = wf.Find("emb.weight")->shape[1];
  for (const auto& entry : wf.tensors) {
    const std::string& name = entry.first;  // not a structured binding: clang 14 cannot
    const Tensor& t = entry.second;         // capture those in the lambdas below
    std::vector<float> v(t.numel());
    DequantizeRow(t.type, t.data, v.data(), t.numel());
    std::vector<int64_t> shape = t.shape;
    auto ends = [&](const char* s) { return name.ends_with(s); };
    auto map = [&](auto f) {
      for (float& x : v) x = static_cast<float>(f(static_cast<double>(x)));
    };
    if (ends(".time_mix_k") || ends(".time_mix_v") || ends(".time_mix_r") || ends(".time_mix_g") ||
        (name.find(".time_maa_") != std::string::npos && !ends("_w1") && !ends("_w2"))) {
      shape = {1, 1, C};
    }
    if (ends(".att.time_decay")) {
      if (arch == Arch::kV4) map([](double x) { return std::log(-x); }), shape = {C};
      if (arch == Arch::kV5_1)
        map([](double x) { return std::log(-std::log(x)); }), shape = {t.numel()};
      if (arch == Arch::kV5_2)
        map([](double x) { return std::log(-std::log(x)); }), shape = {t.shape[0], t.shape[1]};
      if (arch == Arch::kV6) shape = {1, 1, C};
    }
    if (ends(".att.time_first") && arch == Arch::kV5_1) {
      map([](double x) { return std::log(x); });
      shape = {t.numel()};
    }
    if (ends(".att.time_faaaa")) shape = {t.shape[0], t.shape[1]};
    if (ends(".time_maa_w1") || ends(".time_decay_w1") || ends(".time_decay_w2")) {
      v = TransposeF(v, t.shape[0], t.shape[1]);
      shape = {t.shape[1], t.shape[0]};
    }
    if (ends(".time_maa_w2")) {  // [5, C, D] -> [5, D, C]
      const int64_t S = t.shape[0], Cc = t.shape[1], D = t.shape[2];
      std::vector<float> o(v.size());
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t c = 0; c < Cc; ++c) {
          for (int64_t d = 0; d < D; ++d) o[(s * D + d) * Cc + c] = v[(s * Cc + c) * D + d];
        }
      }
      v = o;
      shape = {S, D, Cc};
    }
    bool fla_transposed = false;
    std::string raw_name = name;
    if (arch == Arch::kV7) {
      if (ends(".att.x_rwkvag")) {
        const std::string prefix = name.substr(0, name.size() - 8);
        const char* mixes[] = {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"};
        for (int i = 0; i < 6; ++i) {
          RawTensor m{prefix + mixes[i],
                      {1, 1, C},
                      std::vector<float>(v.begin() + i * C, v.begin() + (i + 1) * C)};
          if (names == Names::kFla) m.name = ToFla(m.name, &fla_transposed);
          out.push_back(std::move(m));
        }
        continue;
      }
      for (const char* lr : {".w1", ".a1", ".v1", ".g1", ".w2", ".a2", ".v2", ".g2"}) {
        if (ends(lr)) {
          v = TransposeF(v, t.shape[0], t.shape[1]);
          shape = {t.shape[1], t.shape[0]};
        }
      }
      if (names == Names::kFla) {
        raw_name = ToFla(name, &fla_transposed);
        if (fla_transposed) {  // FLA stores nn.Linear weights: the raw matrix transposed back
          v = TransposeF(v, shape[0], shape[1]);
          std::swap(shape[0], shape[1]);
        }
        if (shape.size() == 3 && shape[0] == 1 && shape[1] == 1) shape = {C};
      }
    } else if (names == Names::kTransformers) {
      raw_name = ToTransformers(name);
    }
    out.push_back({raw_name, shape, v});
  }
  return out;
}

struct StressCase {
  std::string version;
  Arch arch;
  Names names;
};

std::string StressCaseName(const ::testing::TestParamInfo<StressCase>& info) {
  const char* n[] = {"BlinkDL", "HuggingFace", "FLA"};
  return "v" + info.param.version + "_" + n[static_cast<int>(info.param.names)];
}

class StressRoundTripTest : public ::testing::TestWithParam<StressCase> {};

TEST_P(StressRoundTripTest, RawCheckpointGivesExactLogits) {
  const StressCase& c = GetParam();
  const std::string bin = "models/stress/stress-rwkv-" + c.version + "-FP32.bin";
  const std::string expected_file =
      "models/stress/expected-logits-stress-rwkv-" + c.version + "-FP32.bin";
  REQUIRE_SHARED(bin);
  REQUIRE_SHARED(expected_file);
  const Bytes bin_bytes = ReadFileBytes(SharedPath(bin));
  const WeightFile wf = ReadRwkvCppBin(bin_bytes, bin);
  const std::vector<RawTensor> raw = RawFromCanonical(wf, c.arch, c.names);
  const std::vector<float> expected = ReadFloats(SharedPath(expected_file));
  const std::vector<float> from_bin = Logits(*LoadBytes(bin_bytes, bin), ExpectedPrompt());

  for (const bool safetensors : {false, true}) {
    const Bytes file = safetensors ? MakeSafetensors(raw, DType::kF32)
                                   : MakePth(raw, DType::kF32, "stress-" + c.version);
    const std::string name = std::string("stress.") + (safetensors ? "safetensors" : "pth");
    auto model = LoadBytes(file, name);
    EXPECT_EQ(model->info().arch, c.arch);
    const auto logits = Logits(*model, ExpectedPrompt());
    const double diff = MaxAbsDiff(logits, expected);
    std::printf("  %s %s: max |logit - exact| = %.3g, vs .bin %.3g\n", c.version.c_str(),
                name.c_str(), diff, MaxAbsDiff(logits, from_bin));
    EXPECT_LE(diff, 1e-4) << name;
    EXPECT_LE(MaxAbsDiff(logits, from_bin), 1e-4) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(AllVersions, StressRoundTripTest,
                         ::testing::Values(StressCase{"4v0", Arch::kV4, Names::kBlinkDl},
                                           StressCase{"5v1", Arch::kV5_1, Names::kBlinkDl},
                                           StressCase{"5v2", Arch::kV5_2, Names::kBlinkDl},
                                           StressCase{"6v0", Arch::kV6, Names::kBlinkDl},
                                           StressCase{"7v0", Arch::kV7, Names::kBlinkDl},
                                           StressCase{"4v0", Arch::kV4, Names::kTransformers},
                                           StressCase{"5v2", Arch::kV5_2, Names::kTransformers},
                                           StressCase{"6v0", Arch::kV6, Names::kTransformers},
                                           StressCase{"7v0", Arch::kV7, Names::kFla}),
                         StressCaseName);

// ---- a generated RWKV-7 against an independent float64 reference ----

// BlinkDL's RWKV-7 (ChatRWKV model.py RWKV_x070_TMix_one / CMix_one), straight from the raw
// tensors (low-rank matrices used as x @ W, separate x_* mixes), in double.
class Rwkv7Reference {
 public:
  Rwkv7Reference(const std::vector<RawTensor>& tensors, const Rwkv7Shape& s) : s_(s) {
    for (const RawTensor& t : tensors) {
      std::vector<double>& d = w_[t.name];
      for (float f : t.values) d.push_back(f);
    }
  }

  std::vector<double> Run(const std::vector<int32_t>& tokens) {
    const int C = s_.width, H = C / s_.head_size, N = s_.head_size, L = s_.layers;
    std::vector<std::vector<double>> att_prev(L, std::vector<double>(C)),
        ffn_prev(L, std::vector<double>(C)), S(L, std::vector<double>(H * N * N));
    std::vector<double> logits;
    for (int32_t tok : tokens) {
      std::vector<double> x(W("emb.weight").begin() + tok * C,
                            W("emb.weight").begin() + (tok + 1) * C);
      x = LayerNorm(x, W("blocks.0.ln0.weight"), W("blocks.0.ln0.bias"), 1e-5);
      std::vector<double> v_first;
      for (int l = 0; l < L; ++l) {
        const std::string b = "blocks." + std::to_string(l) + ".";
        const std::string a = b + "att.";
        std::vector<double> xx = LayerNorm(x, W(b + "ln1.weight"), W(b + "ln1.bias"), 1e-5);
        std::vector<double> sx(C);
        for (int i = 0; i < C; ++i) sx[i] = att_prev[l][i] - xx[i];
        att_prev[l] = xx;
        auto mix = [&](const char* m) {
          std::vector<double> o(C);
          for (int i = 0; i < C; ++i) o[i] = xx[i] + sx[i] * W(a + m)[i];
          return o;
        };
        const auto xr = mix("x_r"), xw = mix("x_w"), xk = mix("x_k"), xv = mix("x_v"),
                   xa = mix("x_a"), xg = mix("x_g");
        std::vector<double> r = Linear(W(a + "receptance.weight"), xr, C);
        std::vector<double> k = Linear(W(a + "key.weight"), xk, C);
        std::vector<double> v = Linear(W(a + "value.weight"), xv, C);
        std::vector<double> w = VecMat(Tanh(VecMat(xw, W(a + "w1"))), W(a + "w2"));
        std::vector<double> aa = VecMat(VecMat(xa, W(a + "a1")), W(a + "a2"));
        std::vector<double> g = VecMat(Sigmoid(VecMat(xg, W(a + "g1"))), W(a + "g2"));
        for (int i = 0; i < C; ++i) aa[i] = Sig(W(a + "a0")[i] + aa[i]);
        std::vector<double> kk(C);
        for (int i = 0; i < C; ++i) kk[i] = k[i] * W(a + "k_k")[i];
        for (int h = 0; h < H; ++h) {
          double norm = 0;
          for (int j = 0; j < N; ++j) norm += kk[h * N + j] * kk[h * N + j];
          norm = std::max(std::sqrt(norm), 1e-12);
          for (int j = 0; j < N; ++j) kk[h * N + j] /= norm;
        }
        for (int i = 0; i < C; ++i) k[i] *= 1 + (aa[i] - 1) * W(a + "k_a")[i];
        if (l == 0) {
          v_first = v;
        } else {
          std::vector<double> vm = VecMat(VecMat(xv, W(a + "v1")), W(a + "v2"));
          for (int i = 0; i < C; ++i) v[i] += (v_first[i] - v[i]) * Sig(W(a + "v0")[i] + vm[i]);
        }
        for (int i = 0; i < C; ++i) w[i] = std::exp(-std::exp(-0.5) * Sig(W(a + "w0")[i] + w[i]));
        std::vector<double> out(C);
        for (int h = 0; h < H; ++h) {
          double* st = S[l].data() + h * N * N;  // st[i * N + j]: value i, key j
          const int o = h * N;
          for (int i = 0; i < N; ++i) {
            double sa = 0;
            for (int j = 0; j < N; ++j) sa += st[i * N + j] * -kk[o + j];
            double y = 0;
            for (int j = 0; j < N; ++j) {
              double& e = st[i * N + j];
              e = e * w[o + j] + sa * kk[o + j] * aa[o + j] + v[o + i] * k[o + j];
              y += e * r[o + j];
            }
            out[o + i] = y;
          }
        }
        for (int h = 0; h < H; ++h) {
          std::vector<double> part(out.begin() + h * N, out.begin() + (h + 1) * N);
          std::vector<double> lw(W(a + "ln_x.weight").begin() + h * N,
                                 W(a + "ln_x.weight").begin() + (h + 1) * N);
          std::vector<double> lb(W(a + "ln_x.bias").begin() + h * N,
                                 W(a + "ln_x.bias").begin() + (h + 1) * N);
          part = LayerNorm(part, lw, lb, 64e-5);
          double bonus = 0;
          for (int j = 0; j < N; ++j)
            bonus += r[h * N + j] * k[h * N + j] * W(a + "r_k")[h * N + j];
          for (int j = 0; j < N; ++j) out[h * N + j] = part[j] + bonus * v[h * N + j];
        }
        for (int i = 0; i < C; ++i) out[i] *= g[i];
        const std::vector<double> att = Linear(W(a + "output.weight"), out, C);
        for (int i = 0; i < C; ++i) x[i] += att[i];

        xx = LayerNorm(x, W(b + "ln2.weight"), W(b + "ln2.bias"), 1e-5);
        std::vector<double> fx(C);
        for (int i = 0; i < C; ++i) {
          fx[i] = xx[i] + (ffn_prev[l][i] - xx[i]) * W(b + "ffn.x_k")[i];
        }
        ffn_prev[l] = xx;
        std::vector<double> hk = Linear(W(b + "ffn.key.weight"), fx, C);
        for (double& e : hk) e = std::max(e, 0.0) * std::max(e, 0.0);
        const std::vector<double> fo = Linear(W(b + "ffn.value.weight"), hk, s_.ffn);
        for (int i = 0; i < C; ++i) x[i] += fo[i];
      }
      x = LayerNorm(x, W("ln_out.weight"), W("ln_out.bias"), 1e-5);
      logits = Linear(W("head.weight"), x, C);
    }
    return logits;
  }

 private:
  const std::vector<double>& W(const std::string& n) const { return w_.at(n); }
  static double Sig(double z) { return 1 / (1 + std::exp(-z)); }
  static std::vector<double> Sigmoid(std::vector<double> v) {
    for (double& e : v) e = Sig(e);
    return v;
  }
  static std::vector<double> Tanh(std::vector<double> v) {
    for (double& e : v) e = std::tanh(e);
    return v;
  }
  // W [out, in] times x.
  static std::vector<double> Linear(const std::vector<double>& w, const std::vector<double>& x,
                                    int in) {
    std::vector<double> y(w.size() / in);
    for (size_t o = 0; o < y.size(); ++o) {
      double acc = 0;
      for (int i = 0; i < in; ++i) acc += w[o * in + i] * x[i];
      y[o] = acc;
    }
    return y;
  }
  // x @ M, M [in, out].
  static std::vector<double> VecMat(const std::vector<double>& x, const std::vector<double>& m) {
    const size_t in = x.size(), out = m.size() / in;
    std::vector<double> y(out);
    for (size_t i = 0; i < in; ++i) {
      for (size_t j = 0; j < out; ++j) y[j] += x[i] * m[i * out + j];
    }
    return y;
  }
  static std::vector<double> LayerNorm(const std::vector<double>& x, const std::vector<double>& w,
                                       const std::vector<double>& b, double eps) {
    double mean = 0, var = 0;
    for (double e : x) mean += e;
    mean /= x.size();
    for (double e : x) var += (e - mean) * (e - mean);
    var /= x.size();
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = (x[i] - mean) / std::sqrt(var + eps) * w[i] + b[i];
    return y;
  }

  Rwkv7Shape s_;
  std::map<std::string, std::vector<double>> w_;
};

std::vector<RawTensor> GenerateRwkv7(const Rwkv7Shape& s, uint64_t seed, bool round_bf16) {
  std::vector<RawTensor> out;
  for (const auto& [name, shape] : Rwkv7Tensors(s)) {
    RawTensor t{name, shape, Rwkv7Values(name, shape, seed)};
    if (round_bf16) {
      for (float& f : t.values) f = BF16ToF32(ToBF16(f));
    }
    out.push_back(std::move(t));
  }
  return out;
}

// rwkv.cpp's .bin of canonical tensors, written by the test itself (its own stacking and
// transposes, independent of blinkdl.cpp).
Bytes CanonicalBin(const std::vector<RawTensor>& raw, const Rwkv7Shape& s) {
  std::vector<RawTensor> canon;
  std::map<std::string, std::vector<float>> stacks;
  for (const RawTensor& t : raw) {
    const std::string& n = t.name;
    if (n == "blocks.0.att.v0" || n == "blocks.0.att.v1" || n == "blocks.0.att.v2") continue;
    const size_t x = n.find(".att.x_");
    if (x != std::string::npos) {
      auto& st = stacks[n.substr(0, x) + ".att.x_rwkvag"];
      st.insert(st.end(), t.values.begin(), t.values.end());
      if (n.ends_with("x_g")) canon.push_back({n.substr(0, x) + ".att.x_rwkvag", {6, s.width}, st});
      continue;
    }
    bool low_rank = false;
    for (const char* lr : {".w1", ".a1", ".v1", ".g1", ".w2", ".a2", ".v2", ".g2"}) {
      low_rank |= n.ends_with(lr);
    }
    if (low_rank) {
      canon.push_back({n, {t.shape[1], t.shape[0]}, TransposeF(t.values, t.shape[0], t.shape[1])});
    } else {
      canon.push_back(t);
    }
  }
  Bytes out;
  for (int64_t v : {int64_t{0x67676d66}, int64_t{101}, int64_t{s.vocab}, int64_t{s.width},
                    int64_t{s.layers}, int64_t{0}}) {
    Put(out, static_cast<uint64_t>(v), 4);
  }
  for (const RawTensor& t : canon) {
    Put(out, t.shape.size(), 4);
    Put(out, t.name.size(), 4);
    Put(out, 0, 4);
    for (size_t i = t.shape.size(); i-- > 0;) Put(out, t.shape[i], 4);
    PutStr(out, t.name);
    const Bytes data = Encode(DType::kF32, t.values);
    out.insert(out.end(), data.begin(), data.end());
  }
  return out;
}

// A BF16 checkpoint converted to GGUF (types kept, or --type bf16: lossless either way) gives
// the same logits in the default mode too (rounded activations), where the kernel chosen for
// a matrix depends on its stored type: the low-rank matrices rebuilt from [in, out] keep it.
TEST(GeneratedRwkv7, Bf16PthAndItsGgufGiveTheSameDefaultLogits) {
  aviary::testing::RoundedActivations rounded(true);
  Rwkv7Shape s;  // 0.4B's width and low-rank sizes, 2 layers
  s.width = 1024;
  s.ffn = 4096;
  s.d_decay = 64;
  s.d_aaa = 64;
  s.d_mv = 32;
  s.d_gate = 128;
  const std::vector<RawTensor> raw = GenerateRwkv7(s, 7, /*round_bf16=*/true);
  const std::vector<int32_t> tokens = {17, 998, 3, 512, 17, 40, 41};
  const Bytes pth_bytes = MakePth(raw, DType::kBF16, "rwkv7-gen");
  auto pth = LoadBytes(pth_bytes, "gen.pth");
  const WeightFile wf = ReadWeightFile(pth_bytes, "gen.pth");
  const std::string path = aviary::testing::ProcessTempDir() + "bf16-pth.gguf";
  for (const std::optional<DType> type : {std::optional<DType>(), std::optional(DType::kBF16)}) {
    SCOPED_TRACE(type ? "--type bf16" : "types kept");
    GgufWriteOptions options;
    options.type = type;
    WriteGguf(wf, pth->info(), options, path);
    auto gguf = Model::Load(path);
    EXPECT_EQ(Logits(*pth, tokens), Logits(*gguf, tokens));
  }
  std::remove(path.c_str());
}

TEST(GeneratedRwkv7, PthSafetensorsBinAndReferenceAgree) {
  // Float products everywhere: the BF16 files must give the F32 file's logits bit for bit.
  aviary::testing::RoundedActivations exact(false);
  const Rwkv7Shape s;  // 2 layers x 256, 4 heads of 64, vocab 1000
  const std::vector<RawTensor> raw = GenerateRwkv7(s, 42, /*round_bf16=*/true);
  const std::vector<int32_t> tokens = {17, 998, 3, 512, 17};

  // LoadFromMemory keeps views into the bytes: they must outlive the models.
  const Bytes pth_bytes = MakePth(raw, DType::kBF16, "rwkv7-gen");
  const Bytes st_bytes = MakeSafetensors(raw, DType::kBF16);
  const Bytes bin_bytes = CanonicalBin(raw, s);
  auto pth = LoadBytes(pth_bytes, "gen.pth");
  auto st = LoadBytes(st_bytes, "gen.safetensors");
  auto bin = LoadBytes(bin_bytes, "gen.bin");
  EXPECT_EQ(pth->info().arch, Arch::kV7);
  EXPECT_EQ(pth->info().n_head, 4);
  EXPECT_EQ(pth->info().head_size, 64);
  EXPECT_EQ(pth->info().n_vocab, 1000);
  EXPECT_EQ(pth->info().main_type, "BF16");
  const auto a = Logits(*pth, tokens);
  const auto b = Logits(*st, tokens);
  const auto c = Logits(*bin, tokens);
  EXPECT_EQ(a, b);  // same bytes, same layout: bit-identical
  EXPECT_EQ(a, c);  // bf16 widened exactly; the same F32 canonical layout
  // Independent float64 implementation of BlinkDL's math on the raw tensors.
  const std::vector<double> ref = Rwkv7Reference(raw, s).Run(tokens);
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::fabs(a[i] - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  std::printf(
      "  generated RWKV-7 2x256: max |aviary - float64 reference| = %.3g "
      "(logits up to %.3g)\n",
      diff, scale);
  EXPECT_GT(scale, 0.5);  // the model is not degenerate
  EXPECT_LE(diff, 2e-4);
  // A low-rank matrix stored the wrong way round is caught by the shape checks.
  std::vector<RawTensor> bad = raw;
  for (RawTensor& t : bad) {
    if (t.name == "blocks.1.att.a1") {
      t.values = TransposeF(t.values, t.shape[0], t.shape[1]);
      t.shape = {t.shape[1], t.shape[0]};
    }
  }
  EXPECT_TRUE(Refused(MakePth(bad, DType::kBF16), "bad.pth", "blocks.1.att.a"));
}

TEST(GeneratedRwkv7, ZipVariantsGiveTheSameModel) {
  Rwkv7Shape s;
  s.layers = 1, s.width = 64, s.head_size = 32, s.vocab = 50, s.ffn = 128;
  s.d_decay = s.d_aaa = s.d_mv = s.d_gate = 8;
  const std::vector<RawTensor> raw = GenerateRwkv7(s, 7, false);
  const auto base = Logits(*LoadBytes(MakePth(raw, DType::kF32), "a.pth"), {1, 2, 3});
  ZipOptions zip64;
  zip64.zip64_entries = true;
  ZipOptions plain;
  plain.zip64_end = false;
  plain.data_descriptor = false;
  plain.align = 1;  // unaligned F32 data must work too
  for (const ZipOptions& o : {zip64, plain}) {
    EXPECT_EQ(Logits(*LoadBytes(MakePth(raw, DType::kF32, "x", o), "b.pth"), {1, 2, 3}), base);
  }
  // Deflated pickle and storages (torch never compresses, but zip tools might).
  std::vector<PickledTensor> pt;
  for (size_t i = 0; i < raw.size(); ++i) {
    pt.push_back(
        {raw[i].name, "FloatStorage", std::to_string(i), Numel(raw[i].shape), 0, raw[i].shape, {}});
  }
  Bytes deflated;
  ZipWriter zip(Sink::ToBytes(&deflated));
  zip.Add("m/data.pkl", StateDictPickle(pt), true);
  for (size_t i = 0; i < raw.size(); ++i) {
    zip.Add("m/data/" + std::to_string(i), Encode(DType::kF32, raw[i].values), true);
  }
  zip.Finish();
  EXPECT_EQ(Logits(*LoadBytes(deflated, "c.pth"), {1, 2, 3}), base);
  // F16 storages.
  EXPECT_EQ(LoadBytes(MakePth(raw, DType::kF16), "d.pth")->info().main_type, "F16");
}

// ---- hostile input ----

// A small valid v7 checkpoint to corrupt.
const std::vector<RawTensor>& SmallRaw() {
  static const std::vector<RawTensor> raw = [] {
    Rwkv7Shape s;
    s.layers = 1, s.width = 8, s.head_size = 8, s.vocab = 4, s.ffn = 8;
    s.d_decay = s.d_aaa = s.d_mv = s.d_gate = 2;
    return GenerateRwkv7(s, 3, false);
  }();
  return raw;
}

Bytes PthWithPickle(const Bytes& pickle,
                    const std::vector<std::pair<std::string, Bytes>>& extra = {}) {
  Bytes out;
  ZipWriter zip(Sink::ToBytes(&out));
  zip.Add("evil/data.pkl", pickle);
  for (const auto& [n, d] : extra) zip.Add("evil/" + n, d);
  zip.Finish();
  return out;
}

TEST(EvilPickle, RefusesDangerousGlobalsWithoutRunningThem) {
  const std::string marker =
      (std::filesystem::temp_directory_path() / ("aviary-pwned-" + std::to_string(getpid())))
          .string();
  std::filesystem::remove(marker);
  // The classic payload: os.system("touch <marker>") via GLOBAL + REDUCE.
  for (const auto& [module, name] : {std::pair{"os", "system"},
                                     {"posix", "system"},
                                     {"builtins", "eval"},
                                     {"builtins", "exec"},
                                     {"subprocess", "call"},
                                     {"torch", "load"},
                                     {"collections", "defaultdict"},
                                     {"torch._utils", "_rebuild_qtensor"}}) {
    PickleWriter p;
    p.Proto(2)
        .Global(module, name)
        .Mark()
        .Str(std::string("touch ") + marker)
        .Op('t')
        .Op('R')
        .Stop();
    EXPECT_TRUE(Refused(PthWithPickle(p.bytes), "evil.pth",
                        std::string("refusing pickle global ") + module + "." + name));
    // The same through protocol 4's STACK_GLOBAL.
    PickleWriter q;
    q.Proto(4).Str(module).Str(name).Op(0x93).Mark().Str("x").Op('t').Op('R').Stop();
    EXPECT_TRUE(Refused(PthWithPickle(q.bytes), "evil.pth",
                        std::string("refusing pickle global ") + module + "." + name));
  }
  EXPECT_FALSE(std::filesystem::exists(marker)) << "a pickle payload ran!";
}

TEST(EvilPickle, RefusesReduceOnAnythingButTheAllowList) {
  // REDUCE on an allowed but non-callable global (a storage class), a string, a dict.
  PickleWriter a;
  a.Proto().Global("torch", "FloatStorage").Op(')').Op('R').Stop();
  EXPECT_TRUE(Refused(PthWithPickle(a.bytes), "evil.pth", "refusing REDUCE on torch.FloatStorage"));
  PickleWriter b;
  b.Proto().Str("os.system").Op(')').Op('R').Stop();
  EXPECT_TRUE(Refused(PthWithPickle(b.bytes), "evil.pth", "refusing REDUCE on a string"));
  PickleWriter c;
  c.Proto().Op('}').Op(')').Op('R').Stop();
  EXPECT_TRUE(Refused(PthWithPickle(c.bytes), "evil.pth", "refusing REDUCE on a dict"));
  PickleWriter d;  // OrderedDict with arguments
  d.Proto().Global("collections", "OrderedDict").Mark().Str("x").Op('t').Op('R').Stop();
  EXPECT_TRUE(Refused(PthWithPickle(d.bytes), "evil.pth", "OrderedDict with arguments"));
  PickleWriter e;  // BUILD on something that is not a dict
  e.Proto().Global("torch", "FloatStorage").Op('}').Op('b').Stop();
  EXPECT_TRUE(Refused(PthWithPickle(e.bytes), "evil.pth", "refusing BUILD"));
}

TEST(EvilPickle, RefusesUnknownAndUnsupportedOpcodes) {
  const std::pair<uint8_t, const char*> ops[] = {
      {'i', "INST"},     {'o', "OBJ"},      {0x81, "NEWOBJ"}, {0x92, "NEWOBJ_EX"},
      {'2', "DUP"},      {'0', "POP"},      {0x82, "EXT1"},   {'B', "BINBYTES"},
      {'G', "BINFLOAT"}, {'S', "STRING"},   {'P', "PERSID"},  {'d', "DICT"},
      {0xff, "unknown"}, {0x99, "unknown"}, {'Z', "unknown"}, {0x8f, "EMPTY_SET"}};
  for (const auto& [op, opname] : ops) {
    PickleWriter p;
    p.Proto().Op(op).Stop();
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", op);
    EXPECT_TRUE(Refused(PthWithPickle(p.bytes), "evil.pth",
                        std::string("refusing pickle opcode ") + opname + " (" + hex + ")"));
  }
  PickleWriter proto;
  proto.Proto(9).Stop();
  EXPECT_TRUE(Refused(PthWithPickle(proto.bytes), "evil.pth", "unsupported pickle protocol 9"));
}

TEST(EvilPickle, StructuralNonsenseIsRefusedQuickly) {
  auto refused = [](PickleWriter& p, const char* needle) {
    EXPECT_TRUE(Refused(PthWithPickle(p.bytes), "evil.pth", needle));
  };
  PickleWriter underflow;
  underflow.Proto().Op('R').Stop();
  refused(underflow, "stack underflow");
  PickleWriter across_mark;  // popping below a MARK
  across_mark.Proto().Op('}').Mark().Op('s').Stop();
  refused(across_mark, "stack underflow");
  PickleWriter no_mark;
  no_mark.Proto().Op('t').Stop();
  refused(no_mark, "no MARK");
  PickleWriter unset_memo;
  unset_memo.Proto().Op('j').Op(0xff).Op(0xff).Op(0xff).Op(0xff).Stop();
  refused(unset_memo, "memo key 4294967295 is not set");
  PickleWriter not_dict;
  not_dict.Proto().Op(']').Stop();
  refused(not_dict, "the top-level object is a list");
  PickleWriter not_tensor;
  not_tensor.Proto().Op('}').Str("emb.weight").Int(5).Op('s').Stop();
  refused(not_tensor, "entry 'emb.weight' is an int, not a tensor");
  PickleWriter empty;
  empty.Proto().Op('}').Stop();
  refused(empty, "holds no tensors");
  PickleWriter deep_marks;
  deep_marks.Proto();
  for (int i = 0; i < 100000; ++i) deep_marks.Mark();
  refused(deep_marks, "MARKs nested too deeply");
  PickleWriter long_int;
  long_int.Proto().Op(0x8a).Op(9);
  for (int i = 0; i < 9; ++i) long_int.Op(1);
  long_int.Stop();
  refused(long_int, "too large");
  PickleWriter huge_string;  // declares 4 GB of string
  huge_string.Proto().Op('X').Op(0xff).Op(0xff).Op(0xff).Op(0xff).Stop();
  refused(huge_string, "truncated");
  PickleWriter persid;  // persistent id that is not a storage
  persid.Proto().Mark().Str("module").Str("os").Op('t').Op('Q').Stop();
  refused(persid, "persistent id");
  PickleWriter persid_type;
  persid_type.Proto()
      .Mark()
      .Str("storage")
      .Str("FloatStorage")
      .Str("0")
      .Str("cpu")
      .Int(4)
      .Op('t')
      .Op('Q')
      .Stop();
  refused(persid_type, "names no torch storage type");

  // Deep nesting and self-referencing containers: no recursion, no leak, then refused.
  PickleWriter nested;
  nested.Proto().Op(')');
  for (int i = 0; i < 200000; ++i) nested.Op(0x85);
  nested.Stop();
  refused(nested, "the top-level object is a tuple");
  PickleWriter cycle;
  cycle.Proto().Op(']').Put1(0).Get1(0).Op('a').Get1(0).Op('a').Stop();
  refused(cycle, "the top-level object is a list");
  PickleWriter dict_cycle;
  dict_cycle.Proto().Op('}').Put1(0).Str("k").Get1(0).Op('s').Stop();
  refused(dict_cycle, "entry 'k' is a dict, not a tensor");
}

// A state dict whose single tensor is described by `t`, with storage entry `data`.
Bytes OneTensorPth(const PickledTensor& t, const Bytes& data) {
  return PthWithPickle(StateDictPickle({t}), {{"data/" + t.key, data}});
}

TEST(EvilPickle, ImpossibleTensorsAreRefused) {
  const Bytes data(40, 0);  // 10 floats
  auto tensor = [](std::vector<int64_t> shape, std::vector<int64_t> strides = {},
                   int64_t offset = 0, int64_t numel = 10) {
    return PickledTensor{"emb.weight", "FloatStorage", "0", numel, offset, shape, strides};
  };
  EXPECT_TRUE(
      Refused(OneTensorPth(tensor({100}), data), "evil.pth",
              "tensor 'emb.weight': 100 elements at offset 0 do not fit in its storage of 10"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({5}, {}, 6), data), "evil.pth", "do not fit"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({5}, {}, -1), data), "evil.pth", "do not fit"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({2, 5}, {1, 2}), data), "evil.pth", "not contiguous"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({5, 2}, {4, 1}), data), "evil.pth", "not contiguous"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({int64_t{1} << 40, int64_t{1} << 40}), data), "evil.pth",
                      "impossibly large"));
  EXPECT_TRUE(
      Refused(OneTensorPth(tensor({int64_t{1} << 41}), data), "evil.pth", "invalid dimension"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({-3}), data), "evil.pth", "invalid dimension"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({2}, {1, 1}), data), "evil.pth",
                      "size and stride have different lengths"));
  // The storage entry's size must match what the pickle says it holds.
  EXPECT_TRUE(Refused(OneTensorPth(tensor({10}, {}, 0, 1000000000), data), "evil.pth",
                      "holds 40 bytes, but the pickle says 1000000000 elements"));
  EXPECT_TRUE(Refused(OneTensorPth(tensor({10}, {}, 0, 9), data), "evil.pth", "holds 40 bytes"));
  // A missing storage, an unsupported storage type, a bad key.
  EXPECT_TRUE(Refused(PthWithPickle(StateDictPickle({tensor({10})})), "evil.pth",
                      "storage 'evil/data/0' is missing"));
  PickledTensor dbl = tensor({5});
  dbl.storage_type = "DoubleStorage";
  EXPECT_TRUE(Refused(OneTensorPth(dbl, data), "evil.pth",
                      "storage type torch.DoubleStorage is not supported"));
  PickledTensor slash = tensor({10});
  slash.key = "../x";
  EXPECT_TRUE(Refused(OneTensorPth(slash, data), "evil.pth", "invalid storage key"));
  // Two tensors disagreeing about one storage.
  PickledTensor t1 = tensor({10}), t2 = tensor({4}, {}, 0, 4);
  t2.name = "head.weight";
  EXPECT_TRUE(Refused(PthWithPickle(StateDictPickle({t1, t2}), {{"data/0", data}}), "evil.pth",
                      "described inconsistently"));
  // Sharing a storage at different offsets is fine (then it fails later: not an RWKV model).
  PickledTensor s1 = tensor({4}), s2 = tensor({6}, {}, 4);
  s2.name = "head.weight";
  EXPECT_TRUE(Refused(PthWithPickle(StateDictPickle({s1, s2}), {{"data/0", data}}), "evil.pth",
                      "not an RWKV checkpoint"));
  // Duplicate keys in the dict.
  EXPECT_TRUE(Refused(PthWithPickle(StateDictPickle({s1, s1}), {{"data/0", data}}), "evil.pth",
                      "appears twice"));
}

TEST(EvilZip, TruncatedAtEveryOffset) {
  const Bytes good = MakePth(SmallRaw(), DType::kF32, "small");
  ASSERT_TRUE(LoadsOrRefuses(good, "small.pth"));
  LoadBytes(good, "small.pth");  // the intact file loads
  for (size_t n = 0; n < good.size(); ++n) {
    const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    ASSERT_TRUE(Refused(cut, "cut.pth")) << "cut at " << n << " of " << good.size();
  }
}

TEST(EvilZip, TruncatedPickleAtEveryOffset) {
  std::vector<PickledTensor> pt;
  std::vector<std::pair<std::string, Bytes>> storages;
  const auto& raw = SmallRaw();
  for (size_t i = 0; i < raw.size(); ++i) {
    pt.push_back(
        {raw[i].name, "FloatStorage", std::to_string(i), Numel(raw[i].shape), 0, raw[i].shape, {}});
    storages.push_back({"data/" + std::to_string(i), Encode(DType::kF32, raw[i].values)});
  }
  const Bytes pickle = StateDictPickle(pt);
  ASSERT_NO_THROW(LoadBytes(PthWithPickle(pickle, storages), "whole.pth"));
  for (size_t n = 0; n < pickle.size(); ++n) {
    const Bytes cut(pickle.begin(), pickle.begin() + static_cast<std::ptrdiff_t>(n));
    ASSERT_TRUE(Refused(PthWithPickle(cut, storages), "evil.pth")) << "pickle cut at " << n;
  }
}

TEST(EvilZip, LyingDirectoryAndHeaders) {
  Bytes good;
  ZipWriter zip(Sink::ToBytes(&good));
  const auto& raw = SmallRaw();
  std::vector<PickledTensor> pt;
  for (size_t i = 0; i < raw.size(); ++i) {
    pt.push_back(
        {raw[i].name, "FloatStorage", std::to_string(i), Numel(raw[i].shape), 0, raw[i].shape, {}});
  }
  zip.Add("evil/data.pkl", StateDictPickle(pt));
  for (size_t i = 0; i < raw.size(); ++i) {
    zip.Add("evil/data/" + std::to_string(i), Encode(DType::kF32, raw[i].values));
  }
  const uint64_t last_local = zip.last_local_offset();
  zip.Finish();
  const uint64_t cd = zip.central_offset(), eocd = zip.end_offset();
  ASSERT_NO_THROW(LoadBytes(good, "evil.pth"));
  // Offsets of the first central directory header's fields, and of the ZIP64 end record.
  const size_t z64 = eocd - 20 - 56;
  auto patched = [&](size_t at, uint64_t v, int n) {
    Bytes b = good;
    Patch(b, at, v, n);
    return b;
  };
  auto patched2 = [&](size_t at1, uint64_t v1, size_t at2, uint64_t v2) {
    Bytes b = good;
    Patch(b, at1, v1, 4);
    Patch(b, at2, v2, 4);
    return b;
  };
  struct Case {
    Bytes bytes;
    const char* needle;
  };
  const Case cases[] = {
      {patched2(cd + 20, 0x7fffffff, cd + 24, 0x7fffffff), "runs past the data area"},  // sizes
      {patched(cd + 24, 0x7fffffff, 4), "stored but its sizes differ"},  // uncompressed size
      {patched(cd + 42, last_local, 4), "names a different entry"},      // local offset
      {patched(cd + 42, 0x7ffffff0, 4), "outside the data area"},
      {patched(cd + 42, 1, 4), "no local header"},
      {patched(cd + 10, 12, 2), "compression method 12"},  // bzip2
      {patched(cd + 8, 0x0809, 2), "is encrypted"},
      {patched(cd + 28, 0xffff, 2), "runs past the central directory"},  // name length
      {patched(cd, 0x12345678, 4), "bad signature"},
      {patched(z64 + 32, 1000000, 8), "disagree on the entry count"},  // ZIP64 total
      {patched(z64 + 48, 1, 8), "disagree on the directory offset"},
      {patched(eocd + 10, 5, 2), "disagree on the entry count"},
      {patched(eocd - 20 + 8, 0x7fffffff, 8), "outside the file"},  // locator offset
      {patched(eocd + 12, 0xfffffff0, 4), "disagree on the directory size"},
      {patched(eocd + 4, 1, 2), "multi-disk"},
      {patched(eocd, 0, 4), "no end of central directory"},
      // local header lies
      {patched(0 + 26, 200, 2), "local header"},                // local name length
      {patched(0 + 28, 0xffff, 2), "runs past the data area"},  // local extra length
      {patched(0 + 8, 8, 2), "local header disagrees on the method"},
  };
  for (const Case& c : cases) EXPECT_TRUE(Refused(c.bytes, "evil.pth", c.needle)) << c.needle;
  // Without the ZIP64 records, the classic end record's own fields are checked.
  ZipOptions classic;
  classic.zip64_end = false;
  Bytes plain;
  ZipWriter z2(Sink::ToBytes(&plain), classic);
  z2.Add("evil/data.pkl", StateDictPickle(pt));
  z2.Finish();
  const uint64_t e2 = z2.end_offset();
  Bytes p1 = plain;
  Patch(p1, e2 + 12, 0x10000, 4);
  EXPECT_TRUE(Refused(p1, "evil.pth", "lies outside the file"));
  Bytes p2 = plain;
  Patch(p2, e2 + 10, 5000, 2);
  Patch(p2, e2 + 8, 5000, 2);
  EXPECT_TRUE(Refused(p2, "evil.pth", "cannot fit in a central directory"));
  Bytes p3 = plain;
  Patch(p3, e2 + 10, 0xffff, 2);
  Patch(p3, e2 + 8, 0xffff, 2);
  EXPECT_TRUE(Refused(p3, "evil.pth", "needs a ZIP64 record"));
  // CRC of the pickle is checked.
  Bytes p4 = plain;
  p4[z2.last_data_offset() + 10] ^= 0x40;  // a byte inside data.pkl
  EXPECT_TRUE(Refused(p4, "evil.pth", "CRC mismatch"));
  // Two directory entries pointing at the same local header: duplicate or overlap.
  Bytes dup;
  ZipWriter z3(Sink::ToBytes(&dup), classic);
  z3.Add("a/data.pkl", std::string_view("x"));
  z3.Add("a/data.pkl", std::string_view("y"));
  z3.Finish();
  EXPECT_TRUE(Refused(dup, "evil.pth", "appears twice"));
  (void)last_local;
}

TEST(EvilZip, ZipBombAndMissingPickle) {
  // A deflated entry that claims to inflate to 16 GB.
  Bytes bomb;
  ZipOptions o;
  o.zip64_entries = true;
  ZipWriter z(Sink::ToBytes(&bomb), o);
  z.Add("b/data.pkl", Bytes(1000, 0), true);
  z.Finish();
  const size_t cd = z.central_offset();
  Patch(bomb, cd + 46 + std::string("b/data.pkl").size() + 4, uint64_t{16} << 30, 8);
  EXPECT_TRUE(Refused(bomb, "bomb.pth", "a state dict's pickle is never that large"));
  // A deflated storage that claims 16 GB (and a pickle that agrees).
  Bytes storage_bomb;
  ZipWriter zb(Sink::ToBytes(&storage_bomb), o);
  zb.Add("b/data.pkl",
         StateDictPickle({{"emb.weight", "FloatStorage", "0", int64_t{4} << 30, 0, {10}, {}}}));
  zb.Add("b/data/0", Bytes(1000, 0), true);
  zb.Finish();
  const size_t second = zb.central_offset() + 46 + 10 + 28;  // the storage's directory entry
  Patch(storage_bomb, second + 46 + std::string("b/data/0").size() + 4, uint64_t{16} << 30, 8);
  EXPECT_TRUE(Refused(storage_bomb, "bomb.pth", "implausible uncompressed size"));
  // A deflated pickle whose stream is shorter than declared.
  Bytes short_stream;
  ZipWriter z2(Sink::ToBytes(&short_stream), o);
  z2.Add("b/data.pkl", Bytes(1000, 0), true);
  z2.Finish();
  Patch(short_stream, z2.central_offset() + 46 + 10 + 4, 2000, 8);
  EXPECT_TRUE(Refused(short_stream, "bomb.pth", "corrupt deflate data"));
  // A zip without data.pkl.
  Bytes none;
  ZipWriter z3(Sink::ToBytes(&none));
  z3.Add("readme.txt", std::string_view("hello"));
  z3.Finish();
  EXPECT_TRUE(Refused(none, "x.pth", "no <folder>/data.pkl"));
  // Big-endian storages.
  EXPECT_TRUE(
      Refused(PthWithPickle(Bytes{0x80, 2, '}', '.'}, {{"byteorder", Bytes{'b', 'i', 'g'}}}),
              "x.pth", "big-endian"));
}

TEST(EvilZip, RandomCorruptionLoadsOrRefuses) {
  const Bytes good = MakePth(SmallRaw(), DType::kF32, "small");
  std::mt19937_64 rng(1234);
  for (int iter = 0; iter < 3000; ++iter) {
    Bytes b = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) b[rng() % b.size()] = static_cast<uint8_t>(rng());
    ASSERT_TRUE(LoadsOrRefuses(b, "fuzz.pth")) << "iteration " << iter;
  }
}

// ---- safetensors ----

Bytes SafetensorsWithHeader(const std::string& header, size_t data_bytes = 64) {
  Bytes out;
  Put(out, header.size(), 8);
  PutStr(out, header);
  out.insert(out.end(), data_bytes, 0);
  return out;
}

TEST(EvilSafetensors, BrokenHeadersAreRefused) {
  auto one = [](const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return "{\"emb.weight\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":" + offsets + "}}";
  };
  struct Case {
    Bytes bytes;
    const char* needle;
  };
  Bytes too_long = SafetensorsWithHeader(one("F32", "[4]", "[0,16]"));
  Patch(too_long, 0, 1000000, 8);
  Bytes huge_len = SafetensorsWithHeader(one("F32", "[4]", "[0,16]"));
  Patch(huge_len, 0, ~uint64_t{0}, 8);
  const Case cases[] = {
      {SafetensorsWithHeader(one("F32", "[4]", "[0,1000]")), "lie outside the data"},
      {SafetensorsWithHeader(one("F32", "[4]", "[60,76]")), "lie outside the data"},
      {SafetensorsWithHeader(one("F32", "[4]", "[-16,0]")), "non-negative integers"},
      {SafetensorsWithHeader(one("F32", "[4]", "[16,0]")), "lie outside the data"},
      {SafetensorsWithHeader(one("F32", "[4]", "[0.5,16]")), "non-negative integers"},
      {SafetensorsWithHeader(one("F32", "[4]", "[0,8]")), "needs 16 bytes"},
      {SafetensorsWithHeader(one("F32", "[4]", "[0]")), "data_offsets is not a [begin, end] pair"},
      {SafetensorsWithHeader(one("F32", "[-4]", "[0,16]")), "other than sizes"},
      {SafetensorsWithHeader(one("F32", "[1099511627776,1099511627776]", "[0,16]")),
       "impossibly large"},
      {SafetensorsWithHeader(one("Q4_K", "[4]", "[0,16]")), "unknown dtype 'Q4_K'"},
      {SafetensorsWithHeader(one("F64", "[4]", "[0,32]")), "dtype F64 is not supported"},
      {SafetensorsWithHeader(one("I64", "[4]", "[0,32]")), "dtype I64 is not supported"},
      {SafetensorsWithHeader(
           "{\"emb.weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}"),
       "not valid JSON"},
      {SafetensorsWithHeader("{not json at all}"), "not valid JSON"},
      {SafetensorsWithHeader("{\"__metadata__\":{}}"), "holds no tensors"},
      {SafetensorsWithHeader("{\"emb.weight\":5}"), "not an object"},
      {SafetensorsWithHeader("{\"emb.weight\":{\"shape\":[4],\"data_offsets\":[0,16]}}"),
       "no dtype"},
      {SafetensorsWithHeader("{\"__metadata__\":" + std::string(1000, '[') +
                             std::string(1000, ']') + "}"),
       "nested too deeply"},
      {SafetensorsWithHeader("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                             "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}"),
       "overlap"},
      {too_long, "larger than the file"},
      {huge_len, "larger than the file"},
      {Bytes{1, 0, 0, 0, 0, 0, 0, 0, '{'}, "not valid JSON"},
  };
  for (const Case& c : cases) {
    EXPECT_TRUE(Refused(c.bytes, "evil.safetensors", c.needle)) << c.needle;
  }
  // Truncated at every offset.
  const Bytes good = MakeSafetensors(SmallRaw(), DType::kBF16);
  ASSERT_NO_THROW(LoadBytes(good, "good.safetensors"));
  for (size_t n = 0; n < good.size(); ++n) {
    const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    ASSERT_TRUE(Refused(cut, "cut.safetensors")) << "cut at " << n;
  }
  std::mt19937_64 rng(99);
  for (int iter = 0; iter < 3000; ++iter) {
    Bytes b = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) b[rng() % b.size()] = static_cast<uint8_t>(rng());
    ASSERT_TRUE(LoadsOrRefuses(b, "fuzz.safetensors")) << "iteration " << iter;
  }
}

TEST(EvilCheckpoint, WrongModelContentsAreRefused) {
  std::vector<RawTensor> raw = SmallRaw();
  std::erase_if(raw, [](const RawTensor& t) { return t.name == "blocks.0.att.x_a"; });
  EXPECT_TRUE(Refused(MakePth(raw, DType::kF32), "m.pth", "missing tensor 'blocks.0.att.x_a'"));
  raw = SmallRaw();
  for (RawTensor& t : raw) {
    if (t.name == "blocks.0.att.w1") t.shape = {t.shape[0] * t.shape[1]};
  }
  EXPECT_TRUE(Refused(MakeSafetensors(raw, DType::kF32), "m.safetensors",
                      "tensor 'blocks.0.att.w1' has shape [16], expected a 2-D"));
  raw = SmallRaw();
  raw.push_back({"blocks.0.ffn.s_emb.weight", {4, 4}, std::vector<float>(16)});
  EXPECT_TRUE(Refused(MakePth(raw, DType::kF32), "m.pth", "DeepEmbed"));
  EXPECT_TRUE(
      Refused(MakePth({{"foo", {2}, {1, 2}}}, DType::kF32), "m.pth", "not an RWKV checkpoint"));
  // Hugging Face names colliding with BlinkDL ones after renaming.
  raw = SmallRaw();
  raw.push_back({"rwkv.embeddings.weight", {4, 8}, std::vector<float>(32)});
  raw.push_back({"rwkv.emb.weight", {4, 8}, std::vector<float>(32)});
  EXPECT_TRUE(Refused(MakePth(raw, DType::kF32), "m.pth", "appears twice"));
}

// ---- manual measurement: a realistically shaped RWKV-7 (not run in CI) ----
//
//   build/tests/pth_test --gtest_also_run_disabled_tests --gtest_filter='PthManual.*'
//
// Writes a 24-layer, 1024-wide RWKV-7 with vocabulary 65536 (~0.42 B parameters, ~0.85 GB of
// bf16) as .pth and .safetensors under $TMPDIR, then loads each in a fresh process (this test
// binary, re-run on PthManual.DISABLED_LoadAndRun) and reports load time and peak RSS.
// AVIARY_PTH_KEEP=1 keeps the files; then re-measure one with
//   AVIARY_PTH_MODEL=/tmp/aviary-rwkv7-0.4b.pth build/tests/pth_test
//     --gtest_also_run_disabled_tests --gtest_filter=PthManual.DISABLED_LoadAndRun

std::string VmField(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return line.substr(std::strlen(field) + 1);
  }
  return "?";
}

TEST(PthManual, DISABLED_RealisticRwkv7) {
  Rwkv7Shape s;
  s.layers = 24, s.width = 1024, s.head_size = 64, s.vocab = 65536, s.ffn = 4096;
  s.d_decay = 64, s.d_aaa = 64, s.d_mv = 32, s.d_gate = 128;
  const auto shapes = Rwkv7Tensors(s);
  uint64_t params = 0;
  for (const auto& [n, shape] : shapes) params += Numel(shape);
  const std::string dir = std::filesystem::temp_directory_path().string();
  const std::string pth = dir + "/aviary-rwkv7-0.4b.pth";
  const std::string st = dir + "/aviary-rwkv7-0.4b.safetensors";
  auto values = [&](size_t i) { return Rwkv7Values(shapes[i].first, shapes[i].second, 2024); };
  auto t0 = std::chrono::steady_clock::now();
  {
    std::FILE* f = std::fopen(pth.c_str(), "wb");
    ASSERT_TRUE(f);
    WritePth(Sink::ToFile(f), "aviary-rwkv7-0.4b", DType::kBF16, shapes, values);
    std::fclose(f);
    f = std::fopen(st.c_str(), "wb");
    ASSERT_TRUE(f);
    WriteSafetensors(Sink::ToFile(f), DType::kBF16, shapes, values);
    std::fclose(f);
  }
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "generated %llu parameters (%.3f B) as bf16 .pth (%.1f MB) and .safetensors "
      "(%.1f MB) in %.1f s\n",
      static_cast<unsigned long long>(params), params / 1e9, std::filesystem::file_size(pth) / 1e6,
      std::filesystem::file_size(st) / 1e6, gen_s);
  for (const std::string& file : {pth, st}) {
    const std::string cmd = "AVIARY_PTH_MODEL='" + file + "' /proc/" + std::to_string(getpid()) +
                            "/exe --gtest_also_run_disabled_tests "
                            "--gtest_filter=PthManual.DISABLED_LoadAndRun 2>&1";
    const auto r = testing::RunCommand(cmd);
    struct rusage ru {};
    getrusage(RUSAGE_CHILDREN, &ru);
    std::printf("%s", r.output.substr(r.output.find("[ RUN")).c_str());
    std::printf("child peak RSS so far (getrusage RUSAGE_CHILDREN): %.1f MB\n",
                ru.ru_maxrss / 1024.0);
    EXPECT_EQ(r.exit_code, 0);
  }
  if (!std::getenv("AVIARY_PTH_KEEP")) {
    std::filesystem::remove(pth);
    std::filesystem::remove(st);
  }
}

double CpuSeconds() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

TEST(PthManual, DISABLED_LoadAndRun) {
  const char* path = std::getenv("AVIARY_PTH_MODEL");
  if (!path) GTEST_SKIP() << "set AVIARY_PTH_MODEL";
  const std::string rss0 = VmField("VmRSS:");
  auto t0 = std::chrono::steady_clock::now();
  double cpu0 = CpuSeconds();
  auto model = Model::Load(path);
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double load_cpu = CpuSeconds() - cpu0;
  const std::string rss_loaded = VmField("VmRSS:");
  const ModelInfo& i = model->info();
  std::printf("  %s: RWKV %s, %d layers x %d, %d heads x %d, vocab %d, %.3f B params, main %s\n",
              path, std::string(ArchName(i.arch)).c_str(), i.n_layer, i.n_embd, i.n_head,
              i.head_size, i.n_vocab, i.n_params / 1e9, i.main_type.c_str());
  for (const auto& n : i.notes) std::printf("    converted: %s\n", n.c_str());
  std::printf("  load: %.3f s wall, %.3f s CPU; RSS before %s, after load %s\n", load_s, load_cpu,
              rss0.c_str(), rss_loaded.c_str());
  State state = model->NewState();
  std::vector<float> logits;
  const int32_t tokens[] = {0, 65535, 1234, 42};
  t0 = std::chrono::steady_clock::now();
  cpu0 = CpuSeconds();
  for (int32_t t : tokens) model->Eval(std::span<const int32_t>(&t, 1), state, &logits);
  const double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double run_cpu = CpuSeconds() - cpu0;
  bool finite = true;
  float lo = INFINITY, hi = -INFINITY;
  for (float f : logits) {
    finite &= std::isfinite(f);
    lo = std::min(lo, f);
    hi = std::max(hi, f);
  }
  std::printf(
      "  4 tokens one by one: %.3f s wall (%.0f ms/token), %.3f s CPU; logits finite: %s, "
      "range [%.3g, %.3g]\n",
      run_s, run_s / 4 * 1000, run_cpu, finite ? "yes" : "NO", lo, hi);
  std::printf("  RSS after running %s, peak (VmHWM) %s\n", VmField("VmRSS:").c_str(),
              VmField("VmHWM:").c_str());
  EXPECT_TRUE(finite);
}

}  // namespace
}  // namespace aviary
