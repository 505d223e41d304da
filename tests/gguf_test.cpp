// GGUF: reading, writing, converting and quantizing (docs/GGUF.md).
//  - every shared .bin model converted to GGUF (types kept) gives bit-identical logits;
//  - f32 -> f16/bf16/q8_0/q5_x/q4_x stays within bounds; quantizers are bit-exact with ggml's
//    reference (the shared Q files were written by it from the FP32 models);
//  - GGUF -> GGUF is byte-stable; malformed files fail with aviary::Error naming the file;
//  - the convert and quantize commands.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/gguf.h"
#include "formats/gguf_writer.h"
#include "formats/weight_file.h"
#include "gguf_builder.h"
#include "models/synth.h"
#include "tensor/int8_matmul.h"
#include "tensor/quantize.h"
#include "test_data.h"
#include "tokenizers/tokenizers.h"

namespace aviary::testing {
namespace {

std::string TempPath(const std::string& name) { return ProcessTempDir() + "aviary_gguf_" + name; }

std::vector<uint8_t> ReadAll(const std::string& path) { return ReadFileBytes(path); }

void WriteAll(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::shared_ptr<const TokenizerData> ByteVocab() {
  auto t = std::make_shared<TokenizerData>();
  t->kind = "bytes";
  for (int i = 0; i < 256; ++i) t->tokens.emplace_back(1, static_cast<char>(i));
  return t;
}

// Converts a model file to GGUF bytes through the library (what aviary convert does).
std::vector<uint8_t> ConvertBytes(std::span<const uint8_t> in, const std::string& name,
                                  std::optional<DType> type,
                                  std::shared_ptr<const TokenizerData> tokenizer = ByteVocab()) {
  const WeightFile wf = ReadWeightFile(in, name);
  const std::unique_ptr<Model> model = Model::LoadFromMemory(in, name);
  GgufWriteOptions options;
  options.type = type;
  options.tokenizer = std::move(tokenizer);
  const std::string path = TempPath("convert.gguf");
  WriteGguf(wf, model->info(), options, path);
  std::vector<uint8_t> bytes = ReadAll(path);
  std::remove(path.c_str());
  return bytes;
}

std::vector<float> Logits(const Model& model, const std::vector<int32_t>& tokens) {
  State s = model.NewState();
  std::vector<float> logits;
  model.Eval(tokens, s, &logits, /*all_positions=*/true);
  return logits;
}

const std::vector<int32_t>& LongPrompt() {
  static const std::vector<int32_t> tokens = [] {
    const std::string text =
        "\"in the beginning was the Word, and the Word was with God.\n\t\xc3\xa9";
    std::vector<int32_t> t;
    for (unsigned char c : text) t.push_back(c);
    return t;
  }();
  return tokens;
}

float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

// ---- Quantizers ----

// Independent reference: the nearest half (ties to even) by search over the ordered halves.
uint16_t NearestHalf(float f) {
  if (std::isnan(f)) return std::signbit(f) ? 0xfe00 : 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;  // halfway to 2^16 and beyond: infinity
  uint16_t lo = 0, hi = 0x7bff;            // largest finite
  while (lo < hi) {                        // first half >= a
    const uint16_t mid = (lo + hi) / 2;
    if (F16ToF32(mid) < a) lo = mid + 1;
    else hi = mid;
  }
  uint16_t best = lo;
  if (lo > 0) {
    const double up = F16ToF32(lo) - a, down = a - F16ToF32(lo - 1);
    if (down < up || (down == up && ((lo - 1) & 1) == 0)) best = lo - 1;
  }
  return sign | best;
}

TEST(GgufQuantize, F16AndBF16RoundToNearestEven) {
  std::mt19937 rng(7);
  std::vector<float> values = {0.0f,      -0.0f,    1.0f,      -1.0f,    65504.0f, 65519.99f,
                               65520.0f,  1e-8f,    5.96e-8f,  2.98e-8f, 2.99e-8f, 6.1e-5f,
                               6.097e-5f, INFINITY, -INFINITY, 1e30f,    3.0e-41f};
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = bits(rng);
    // Mostly the range halves can hold, with every mantissa pattern.
    if (i % 4) u = (u & 0x807fffffu) | ((100 + (u >> 23) % 50) << 23);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) values.push_back(f);
  }
  for (float f : values) {
    ASSERT_EQ(F32ToF16(f), NearestHalf(f)) << f;
    // BF16: the nearest of the two truncations, ties to even.
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t lo = static_cast<uint16_t>(u >> 16);
    const uint16_t hi = static_cast<uint16_t>(lo + 1);
    if (std::isinf(f)) {
      EXPECT_EQ(F32ToBF16(f), lo);
      continue;
    }
    const double dlo = std::fabs(static_cast<double>(f) - BF16ToF32(lo));
    const double dhi = std::fabs(BF16ToF32(hi) - static_cast<double>(f));
    const uint16_t want = dlo < dhi || (dlo == dhi && (lo & 1) == 0) ? lo : hi;
    ASSERT_EQ(F32ToBF16(f), want) << f;
  }
  uint16_t h = F32ToBF16(NAN);
  EXPECT_TRUE(std::isnan(BF16ToF32(h)));
}

TEST(GgufQuantize, RoundTripErrorIsBounded) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(4096);
  for (float& v : x) v = normal(rng);
  x[5] = 0;
  std::fill(x.begin() + 64, x.begin() + 96, 0.0f);  // an all-zero block
  struct Case {
    DType type;
    float bound;
  };
  for (const Case c :
       {Case{DType::kF16, 2e-3f}, Case{DType::kBF16, 2e-2f}, Case{DType::kQ8_0, 0.03f},
        Case{DType::kQ5_1, 0.15f}, Case{DType::kQ5_0, 0.2f}, Case{DType::kQ4_1, 0.35f},
        Case{DType::kQ4_0, 0.45f}}) {
    std::vector<uint8_t> q(StorageBytes(c.type, x.size()));
    QuantizeRow(c.type, x.data(), q.data(), x.size());
    std::vector<float> y(x.size());
    DequantizeRow(c.type, q.data(), y.data(), x.size());
    EXPECT_LT(MaxAbsDiff(x, y), c.bound) << DTypeName(c.type);
    for (int i = 64; i < 96; ++i) EXPECT_EQ(y[i], 0.0f) << DTypeName(c.type);
  }
}

// The shared quantized tiny models were written by ggml's reference quantizer from the FP32
// models: quantizing the FP32 matrices again must give the very same bytes. One file set,
// tiny-rwkv-6v0-1m-Q5_0 (from an earlier rwkv.cpp revision), was written by a ggml build whose
// compiler fused x * id + 16.5 into one rounding: it matches QuantRounding::kFusedMultiplyAdd
// instead (and differs from the reference in 74 of 7,000 blocks).
TEST(GgufQuantize, BitExactWithGgmlReference) {
  struct Source {
    std::string fp32, quantized;
  };
  std::vector<Source> sources;
  for (const char* v : {"4v0-660K", "5v1-730K", "5v2-730K", "6v0-1m", "7v0-834K"}) {
    const std::string base = std::string("tiny-rwkv-") + v;
    for (const char* t : {"Q4_0", "Q4_1", "Q8_0"}) {
      sources.push_back(
          {"models/" + base + "-FP32.bin", "models/quantized/" + base + "-" + t + ".bin"});
    }
    for (const char* t : {"Q5_0", "Q5_1"}) {
      sources.push_back({"models/" + base + "-FP32.bin", "models/" + base + "-" + t + ".bin"});
    }
  }
  const std::string fused_file = "models/tiny-rwkv-6v0-1m-Q5_0.bin";
  int compared = 0;
  size_t fused_differences = 0;
  for (const Source& s : sources) {
    REQUIRE_SHARED(s.fp32);
    REQUIRE_SHARED(s.quantized);
    const std::vector<uint8_t> fp32_bytes = ReadFileBytes(SharedPath(s.fp32));
    const std::vector<uint8_t> q_bytes = ReadFileBytes(SharedPath(s.quantized));
    const WeightFile fp32 = ReadRwkvCppBin(fp32_bytes, s.fp32);
    const WeightFile q = ReadRwkvCppBin(q_bytes, s.quantized);
    const bool fused = s.quantized == fused_file;
    int tensors = 0;
    for (const auto& entry : q.tensors) {
      const std::string& name = entry.first;  // not a structured binding: clang 14 cannot
      const Tensor& qt = entry.second;        // capture those in the lambda below
      if (!IsQuantized(qt.type)) continue;
      const Tensor* ft = fp32.Find(name);
      ASSERT_NE(ft, nullptr) << name;
      ASSERT_EQ(ft->type, DType::kF32) << name;
      ASSERT_EQ(ft->numel(), qt.numel()) << name;
      // .bin tensors are not 4-byte aligned: copy before reading them as floats.
      std::vector<float> aligned(ft->numel());
      std::memcpy(aligned.data(), ft->data, aligned.size() * sizeof(float));
      const float* x = aligned.data();
      const size_t block = Traits(qt.type).block_bytes;
      auto differing_blocks = [&](QuantRounding rounding) {
        std::vector<uint8_t> mine(qt.nbytes);
        QuantizeRow(qt.type, x, mine.data(), ft->numel(), rounding);
        size_t bad = 0;
        for (size_t b = 0; b < qt.nbytes / block; ++b) {
          bad += std::memcmp(mine.data() + b * block, qt.data + b * block, block) != 0;
        }
        return bad;
      };
      const size_t reference = differing_blocks(QuantRounding::kReference);
      if (fused) {
        EXPECT_EQ(differing_blocks(QuantRounding::kFusedMultiplyAdd), 0u)
            << s.quantized << " " << name;
        fused_differences += reference;
      } else {
        EXPECT_EQ(reference, 0u) << s.quantized << " " << name << ": " << reference << " of "
                                 << qt.nbytes / block << " blocks differ";
      }
      ++tensors;
    }
    EXPECT_GT(tensors, 0) << s.quantized;
    compared += tensors;
  }
  EXPECT_GT(compared, 300);
  EXPECT_GT(fused_differences, 0u);  // the two roundings are told apart by the data
}

// ---- Conversion of every shared model ----

TEST(Gguf, EverySharedModelConvertsWithIdenticalLogits) {
  int converted = 0;
  for (const ModelCase& c : AllModelCases()) {
    REQUIRE_SHARED(c.model);
    SCOPED_TRACE(c.model);
    const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(c.model));
    const std::vector<uint8_t> gguf = ConvertBytes(bin, c.model, std::nullopt);
    const auto a = Model::LoadFromMemory(bin, c.model);
    const auto b = Model::LoadFromMemory(gguf, "converted.gguf");
    EXPECT_EQ(b->info().arch, a->info().arch);
    EXPECT_EQ(b->info().n_layer, a->info().n_layer);
    EXPECT_EQ(b->info().n_head, a->info().n_head);
    EXPECT_EQ(b->info().main_type, a->info().main_type);
    EXPECT_EQ(b->info().n_params, a->info().n_params);
    ASSERT_NE(b->info().tokenizer_data, nullptr);
    EXPECT_EQ(b->info().tokenizer_data->kind, "bytes");
    const std::vector<float> la = Logits(*a, LongPrompt()), lb = Logits(*b, LongPrompt());
    ASSERT_EQ(la.size(), lb.size());
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0)
        << "max abs diff " << MaxAbsDiff(la, lb);
    // Against the file's exact float64 logits too.
    const std::vector<float> expected = ReadFloats(SharedPath(c.expected));
    std::vector<float> last;
    State s = b->NewState();
    b->Eval(ExpectedPrompt(), s, &last);
    EXPECT_LT(MaxAbsDiff(last, expected), c.rounded_tolerance());  // default activations
    ++converted;
  }
  EXPECT_GE(converted, 40);
}

TEST(Gguf, RoundTripIsByteStable) {
  for (const char* m :
       {"models/stress/stress-rwkv-4v0-FP16.bin", "models/stress/stress-rwkv-5v1-FP32.bin",
        "models/stress/stress-rwkv-5v2-FP16.bin", "models/stress/stress-rwkv-6v0-FP32.bin",
        "models/stress/stress-rwkv-7v0-FP16.bin", "models/tiny-rwkv-6v0-1m-Q5_1.bin",
        "models/quantized/tiny-rwkv-7v0-834K-Q4_0.bin"}) {
    REQUIRE_SHARED(m);
    SCOPED_TRACE(m);
    const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
    for (std::optional<DType> type : {std::optional<DType>(), std::optional<DType>(DType::kQ5_1)}) {
      const std::vector<uint8_t> first = ConvertBytes(bin, m, type);
      const std::vector<uint8_t> second = ConvertBytes(first, "first.gguf", std::nullopt, nullptr);
      // The tokenizer read back from `first` is embedded again.
      const WeightFile wf = ReadGguf(first, "first.gguf");
      const std::vector<uint8_t> third =
          ConvertBytes(first, "first.gguf", std::nullopt, wf.tokenizer);
      EXPECT_EQ(third, first);
      EXPECT_LT(second.size(), first.size());  // same without the tokenizer
      const std::vector<uint8_t> requantized =
          ConvertBytes(first, "first.gguf", type, wf.tokenizer);
      EXPECT_EQ(requantized, first);  // same type again: bytes copied
    }
  }
}

// What llama.cpp needs from a v6/v7 file: its names, shapes (ggml order) and keys.
TEST(Gguf, LlamaCppLayout) {
  const char* m6 = "models/tiny-rwkv-6v0-1m-FP32.bin";
  const char* m7 = "models/stress/stress-rwkv-7v0-FP32.bin";
  REQUIRE_SHARED(m6);
  REQUIRE_SHARED(m7);
  {
    const std::vector<uint8_t> bytes =
        ConvertBytes(ReadFileBytes(SharedPath(m6)), m6, DType::kQ8_0);
    const gguf::File f = gguf::Parse(bytes, "v6.gguf");
    EXPECT_EQ(f.GetString("general.architecture"), "rwkv6");
    EXPECT_EQ(f.GetUint("rwkv6.wkv.head_size"), 8u);
    EXPECT_EQ(f.GetUint("rwkv6.time_mix_extra_dim"), 32u);
    EXPECT_EQ(f.GetUint("rwkv6.time_decay_extra_dim"), 64u);
    EXPECT_EQ(f.GetUint("rwkv6.embedding_length"), 64u);
    EXPECT_EQ(f.GetUint("rwkv6.feed_forward_length"), 224u);
    EXPECT_EQ(f.GetUint("general.file_type"), 7u);
    EXPECT_EQ(f.GetString("tokenizer.ggml.model"), "rwkv");
    EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens").size(), 256u);
    EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[10], "\\n");
    struct Want {
      const char* name;
      std::vector<int64_t> ne;
      DType type;
    };
    for (const Want& w : {Want{"token_embd.weight", {64, 256}, DType::kF32},
                          Want{"output.weight", {64, 256}, DType::kF32},
                          Want{"token_embd_norm.weight", {64}, DType::kF32},
                          Want{"blk.0.time_mix_w1.weight", {64, 160}, DType::kF32},
                          Want{"blk.0.time_mix_w2.weight", {32, 64, 5}, DType::kF32},
                          Want{"blk.0.time_mix_lerp_x.weight", {64}, DType::kF32},
                          Want{"blk.0.time_mix_lerp_fused.weight", {64, 1, 1, 5}, DType::kF32},
                          Want{"blk.0.time_mix_first.weight", {8, 8}, DType::kF32},
                          Want{"blk.0.time_mix_decay.weight", {64}, DType::kF32},
                          Want{"blk.0.time_mix_decay_w1.weight", {64, 64}, DType::kF32},
                          Want{"blk.0.time_mix_decay_w2.weight", {64, 64}, DType::kF32},
                          Want{"blk.11.time_mix_key.weight", {64, 64}, DType::kQ8_0},
                          Want{"blk.0.channel_mix_key.weight", {64, 224}, DType::kQ8_0},
                          Want{"blk.0.channel_mix_value.weight", {224, 64}, DType::kQ8_0},
                          Want{"blk.0.channel_mix_lerp_r.weight", {64}, DType::kF32}}) {
      const gguf::TensorInfo* t = f.FindTensor(w.name);
      ASSERT_NE(t, nullptr) << w.name;
      EXPECT_EQ(t->ne, w.ne) << w.name;
      EXPECT_EQ(t->type, w.type) << w.name;
    }
    EXPECT_EQ(f.tensors.size(), 3 + 3 + 12 * 24u);
  }
  {
    const std::vector<uint8_t> bytes = ConvertBytes(ReadFileBytes(SharedPath(m7)), m7, DType::kF16);
    const gguf::File f = gguf::Parse(bytes, "v7.gguf");
    EXPECT_EQ(f.GetString("general.architecture"), "rwkv7");
    EXPECT_EQ(f.GetUint("rwkv7.wkv.head_size"), 64u);
    EXPECT_EQ(f.GetUint("rwkv7.attention.decay_lora_rank"), 64u);
    EXPECT_EQ(f.GetUint("rwkv7.attention.gate_lora_rank"), 128u);
    struct Want {
      const char* name;
      std::vector<int64_t> ne;
      DType type;
    };
    for (const Want& w : {Want{"blk.0.time_mix_lerp_fused.weight", {128, 1, 1, 6}, DType::kF32},
                          Want{"blk.0.time_mix_r_k.weight", {128}, DType::kF32},
                          Want{"blk.0.time_mix_w1.weight", {128, 64}, DType::kF32},
                          Want{"blk.0.time_mix_a1.weight", {128, 64}, DType::kF16},
                          Want{"blk.0.time_mix_v1.weight", {128, 64}, DType::kF16},  // a1's copy
                          Want{"blk.0.time_mix_v0.weight", {128}, DType::kF32},
                          Want{"blk.0.time_mix_k_k.weight", {128}, DType::kF32},
                          Want{"blk.2.time_mix_key.weight", {128, 128}, DType::kF16},
                          Want{"token_embd.weight", {128, 256}, DType::kF16}}) {
      const gguf::TensorInfo* t = f.FindTensor(w.name);
      ASSERT_NE(t, nullptr) << w.name;
      EXPECT_EQ(t->ne, w.ne) << w.name;
      EXPECT_EQ(t->type, w.type) << w.name;
    }
    const gguf::TensorInfo* v1 = f.FindTensor("blk.0.time_mix_v1.weight");
    const gguf::TensorInfo* a1 = f.FindTensor("blk.0.time_mix_a1.weight");
    EXPECT_EQ(std::memcmp(v1->data, a1->data, a1->nbytes), 0);
    EXPECT_EQ(f.tensors.size() % 3, 0u);
  }
}

float MeanAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) sum += std::fabs(a[i] - b[i]);
  return static_cast<float>(sum / a.size());
}

// The stress models (random weights, every term active, chaotic over 64 tokens: rwkv.cpp's own
// FP16 file of stress v5.1 is 0.29 away from its FP32 one at the first token) bound every type
// loosely; the type policy is checked tensor by tensor.
TEST(Gguf, QuantizedConversionsOfStressModelsStayClose) {
  // The F16/BF16 rows measure their weights' rounding: keep bfloat16 activations out of them
  // (model_test holds the rounded paths to their own bounds). 8-bit activations stay on, as the
  // bounds of the quantized rows were measured with them.
  aviary::testing::RoundedActivations restore;
  aviary::testing::SetBf16Activations(false);
  struct Bound {
    DType type;
    double max_abs, mean_abs;
  };
  // About 2x the worst measured over the five models (docs/GGUF.md).
  const Bound bounds[] = {{DType::kF32, 0, 0},       {DType::kF16, 0.6, 0.004},
                          {DType::kBF16, 0.3, 0.03}, {DType::kQ8_0, 1.4, 0.06},
                          {DType::kQ5_1, 5.2, 0.3},  {DType::kQ5_0, 6.2, 0.35},
                          {DType::kQ4_1, 7.0, 0.6},  {DType::kQ4_0, 10, 0.8}};
  for (const char* v : {"4v0", "5v1", "5v2", "6v0", "7v0"}) {
    const std::string m = std::string("models/stress/stress-rwkv-") + v + "-FP32.bin";
    REQUIRE_SHARED(m);
    const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
    const auto reference = Model::LoadFromMemory(bin, m);
    const std::vector<float> want = Logits(*reference, LongPrompt());
    for (const Bound& b : bounds) {
      SCOPED_TRACE(m + " -> " + std::string(DTypeName(b.type)));
      const std::vector<uint8_t> gguf = ConvertBytes(bin, m, b.type);
      const auto model = Model::LoadFromMemory(gguf, "q.gguf");
      EXPECT_EQ(model->info().main_type, DTypeName(b.type));
      const std::vector<float> got = Logits(*model, LongPrompt());
      EXPECT_LE(MaxAbsDiff(got, want), b.max_abs);
      EXPECT_LE(MeanAbsDiff(got, want), b.mean_abs);
      if (std::getenv("AVIARY_GGUF_PRINT")) {
        std::printf("%-42s %-5s max|dlogit| %.5f mean %.5f size %zu\n", m.c_str(),
                    std::string(DTypeName(b.type)).c_str(), MaxAbsDiff(got, want),
                    MeanAbsDiff(got, want), gguf.size());
      }
      // Policy: the large matrices get the type; vectors stay F32; low-rank matrices and
      // emb/head are never block-quantized.
      const gguf::File f = gguf::Parse(gguf, "q.gguf");
      for (const gguf::TensorInfo& t : f.tensors) {
        const bool big = t.name.find("time_mix_key") != std::string::npos ||
                         t.name.find("channel_mix_value") != std::string::npos;
        if (big) {
          EXPECT_EQ(t.type, b.type) << t.name;
        }
        if (t.ne.size() == 1) {
          EXPECT_EQ(t.type, DType::kF32) << t.name;
        }
        if (IsQuantized(t.type)) {
          EXPECT_TRUE(t.name.find("_w1") == std::string::npos &&
                      t.name.find("_a1") == std::string::npos &&
                      t.name.find("token_embd") == std::string::npos && t.name != "output.weight")
              << t.name;
        }
      }
    }
  }
}

// The tiny models against rwkv.cpp's own quantized and FP16 files of them: the same matrices
// quantized the same way (bit-exact quantizers, emb/head/vectors kept in F32 as rwkv.cpp
// does), so the logits are identical; for v6 aviary also keeps the low-rank matrices in F32
// (rwkv.cpp quantizes time_maa_w1 and time_decay_w1/w2), so it must be at least about as close.
TEST(Gguf, QuantizedConversionsMatchRwkvCpp) {
  // Float activations: this compares the quantized weights, not the kernels.
  aviary::testing::RoundedActivations rounding(false);
  for (const char* v : {"4v0-660K", "5v1-730K", "5v2-730K", "6v0-1m", "7v0-834K"}) {
    const std::string base = std::string("tiny-rwkv-") + v;
    const std::string m = "models/" + base + "-FP32.bin";
    REQUIRE_SHARED(m);
    const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
    const std::vector<float> want = Logits(*Model::LoadFromMemory(bin, m), LongPrompt());
    const bool v6 = std::string(v) == "6v0-1m";
    for (const char* t : {"FP16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"}) {
      const std::string type = t;
      const std::string theirs_path =
          (type == "FP16" || type[1] == '5' ? "models/" : "models/quantized/") + base + "-" + type +
          ".bin";
      REQUIRE_SHARED(theirs_path);
      SCOPED_TRACE(theirs_path);
      const std::vector<uint8_t> theirs_bytes = ReadFileBytes(SharedPath(theirs_path));
      const auto theirs_model = Model::LoadFromMemory(theirs_bytes, theirs_path);
      const std::vector<float> theirs = Logits(*theirs_model, LongPrompt());
      DType dtype = DType::kF16;
      for (DType d : {DType::kQ8_0, DType::kQ5_1, DType::kQ5_0, DType::kQ4_1, DType::kQ4_0}) {
        if (DTypeName(d) == type) dtype = d;
      }
      const std::vector<float> ours =
          Logits(*Model::LoadFromMemory(ConvertBytes(bin, m, dtype), "q.gguf"), LongPrompt());
      const float d_ours = MaxAbsDiff(ours, want), d_theirs = MaxAbsDiff(theirs, want);
      if (std::getenv("AVIARY_GGUF_PRINT")) {
        std::printf("%-32s aviary %.5f rwkv.cpp %.5f\n", theirs_path.c_str(), d_ours, d_theirs);
      }
      if (!v6 && type != "FP16") {
        EXPECT_EQ(ours, theirs) << "max|ours - theirs| " << MaxAbsDiff(ours, theirs);
      } else {
        EXPECT_LE(d_ours, 1.25f * d_theirs + 1e-3f);
      }
    }
  }
}

// K-quants: a synthetic v7 model of width 256 (whole super-blocks) converted from F32 to each
// type. More bits move the logits less, and each K-quant moves them less than the 32-weight
// type of its size class (Q4_K 4.5 bits/weight vs Q4_0 4.5; Q5_K 5.5 vs Q5_1 6).
TEST(GgufQuantize, KQuantModelsBeatTheirSizeClass) {
  aviary::SynthOptions o;
  o.n_layer = 2;
  o.n_embd = 256;
  o.n_vocab = 300;
  o.head_size = 64;
  o.type = DType::kF32;
  o.seed = 7;
  const std::string path = TempPath("k.bin");
  aviary::WriteSynthModel(o, path);
  const std::vector<uint8_t> bin = ReadFileBytes(path);
  std::remove(path.c_str());
  const std::vector<float> want = Logits(*Model::LoadFromMemory(bin, "k.bin"), LongPrompt());
  auto rms_change = [&](DType type) {
    const std::vector<uint8_t> bytes = ConvertBytes(bin, "k.bin", type);
    const gguf::File f = gguf::Parse(bytes, "k.gguf");
    for (const char* name : {"blk.0.time_mix_key.weight", "blk.1.channel_mix_value.weight"}) {
      const gguf::TensorInfo* t = f.FindTensor(name);
      EXPECT_TRUE(t && t->type == type) << name << " " << DTypeName(type);
    }
    const std::vector<float> got = Logits(*Model::LoadFromMemory(bytes, "k.gguf"), LongPrompt());
    double sum = 0, ref = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      sum += (got[i] - want[i]) * (got[i] - want[i]);
      ref += want[i] * want[i];
    }
    std::printf("[ k-quants ] %s: rms logit change / rms logit = %.5f\n",
                std::string(DTypeName(type)).c_str(), std::sqrt(sum / ref));
    return std::sqrt(sum / ref);
  };
  const double q4_0 = rms_change(DType::kQ4_0), q4_k = rms_change(DType::kQ4_K);
  const double q5_1 = rms_change(DType::kQ5_1), q5_k = rms_change(DType::kQ5_K);
  const double q8_0 = rms_change(DType::kQ8_0), q6_k = rms_change(DType::kQ6_K);
  EXPECT_LT(q4_k, q4_0);
  EXPECT_LT(q5_k, q5_1);
  EXPECT_LT(q5_k, q4_k);
  EXPECT_LT(q6_k, q5_k);
  EXPECT_LT(q8_0, q6_k);
  EXPECT_LT(q4_k, 0.2);
}

// Rows that are no whole number of super-blocks (tiny v5.2: width 64) take llama.cpp's
// fallbacks: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0.
TEST(GgufQuantize, KQuantFallsBackForShortRows) {
  const char* m = "models/tiny-rwkv-5v2-730K-FP32.bin";
  REQUIRE_SHARED(m);
  const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
  for (const auto& [type, fallback] :
       {std::pair{DType::kQ4_K, DType::kQ5_0}, std::pair{DType::kQ5_K, DType::kQ5_1},
        std::pair{DType::kQ6_K, DType::kQ8_0}}) {
    const std::vector<uint8_t> bytes = ConvertBytes(bin, m, type);
    const gguf::File f = gguf::Parse(bytes, "fallback.gguf");
    const gguf::TensorInfo* t = f.FindTensor("blk.0.time_mix_key.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->type, fallback) << DTypeName(type);
    EXPECT_NO_THROW(Model::LoadFromMemory(bytes, "fallback.gguf"));
  }
}

// llama.cpp's converter divides rwkv6 output/value matrices by 2^(layer / n) and sets
// rescale_every_n_layers; aviary multiplies them back.
TEST(Gguf, UndoesLlamaCppRescaling) {
  const char* m = "models/stress/stress-rwkv-6v0-FP32.bin";
  REQUIRE_SHARED(m);
  const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
  const std::vector<uint8_t> gguf = ConvertBytes(bin, m, std::nullopt);
  GgufBuilder b = GgufBuilder::From(gguf::Parse(gguf, "x.gguf"));
  b.Set("rwkv6.rescale_every_n_layers", GgufBuilder::U32(1));
  for (int l = 0; l < 3; ++l) {
    for (const char* s : {"time_mix_output", "channel_mix_value"}) {
      GgufBuilder::Tensor* t = b.FindTensor("blk." + std::to_string(l) + "." + s + ".weight");
      ASSERT_NE(t, nullptr);
      ASSERT_EQ(t->type, 0u);
      for (size_t i = 0; i < t->data.size(); i += 4) {
        float x;
        std::memcpy(&x, &t->data[i], 4);
        x = std::ldexp(x, -l);
        std::memcpy(&t->data[i], &x, 4);
      }
    }
  }
  const std::vector<uint8_t> rescaled = b.Build();
  const auto a = Model::LoadFromMemory(bin, m);
  const auto r = Model::LoadFromMemory(rescaled, "rescaled.gguf");
  EXPECT_EQ(Logits(*a, LongPrompt()), Logits(*r, LongPrompt()));
  ASSERT_FALSE(r->info().notes.empty());
  EXPECT_NE(r->info().notes[0].find("rescale_every_n_layers=1"), std::string::npos);
}

// ---- Tokenizers in GGUF ----

TEST(GgufTokenizer, RwkvEscapesRoundTrip) {
  EXPECT_EQ(gguf::EscapeRwkvToken(std::string("\x00", 1)), "\\x00");
  EXPECT_EQ(gguf::EscapeRwkvToken("\n\t\r\\"), "\\n\\t\\r\\\\");
  EXPECT_EQ(gguf::EscapeRwkvToken("it's"), "it's");  // Python switches to "..."
  EXPECT_EQ(gguf::EscapeRwkvToken("'\""), "\\'\"");  // both: '...' escaping '
  EXPECT_EQ(gguf::EscapeRwkvToken("\xe4\xbd\xa0"), "\\xe4\\xbd\\xa0");
  EXPECT_EQ(gguf::EscapeRwkvToken("\x7f"), "\\x7f");
  for (int i = 0; i < 256; ++i) {
    const std::string b(1, static_cast<char>(i));
    EXPECT_EQ(gguf::UnescapeRwkvToken(gguf::EscapeRwkvToken(b)), b) << i;
  }
  EXPECT_EQ(gguf::UnescapeRwkvToken("\\'\\\"\\x4A"), "'\"J");
  EXPECT_FALSE(gguf::UnescapeRwkvToken("abc\\"));
  EXPECT_FALSE(gguf::UnescapeRwkvToken("\\x4"));
  EXPECT_FALSE(gguf::UnescapeRwkvToken("\\xzz"));
}

TEST(GgufTokenizer, ByteLevelRoundTrip) {
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  EXPECT_EQ(gguf::ByteLevelDecode(gguf::ByteLevelEncode(all)), all);
  EXPECT_EQ(gguf::ByteLevelEncode(" the"), "\xc4\xa0the");  // "Ġthe"
  EXPECT_EQ(gguf::ByteLevelEncode("\n"), "\xc4\x8a");       // "Ċ"
}

std::shared_ptr<TokenizerData> SyntheticVocab(const std::string& kind, int n) {
  auto t = std::make_shared<TokenizerData>();
  t->kind = kind;
  t->tokens.resize(n);
  for (int i = 1; i < n; ++i) {
    std::string s;
    for (int k = 0; k <= i % 5; ++k) s += static_cast<char>((i * 37 + k * 11) % 256);
    t->tokens[i] = s;
  }
  if (kind == "gpt2-bpe") {
    t->tokens[0] = "<|endoftext|>";
    t->tokens[7] = "  ";  // added, and the same bytes as the model token 8 ("ĠĠ")
    t->tokens[8] = "  ";
    t->added_tokens = {0, 7};
    t->normalizer = "NFC";
    t->merges = {"\xc4\xa0 t", "h e", "\xc4\xa0t he"};
  }
  t->tokens[n / 2] = "";  // a hole (padding)
  return t;
}

TEST(GgufTokenizer, WorldAndBpeVocabulariesRoundTrip) {
  const char* m = "models/stress/stress-rwkv-7v0-FP16.bin";
  REQUIRE_SHARED(m);
  const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
  for (const char* kind : {"world", "gpt2-bpe"}) {
    SCOPED_TRACE(kind);
    auto vocab = SyntheticVocab(kind, 200);  // the model has 256: the rest is padding
    const std::vector<uint8_t> gguf = ConvertBytes(bin, m, std::nullopt, vocab);
    const WeightFile wf = ReadGguf(gguf, "t.gguf");
    ASSERT_NE(wf.tokenizer, nullptr);
    EXPECT_EQ(wf.tokenizer->kind, kind);
    ASSERT_EQ(wf.tokenizer->tokens.size(), 256u);
    for (int i = 0; i < 256; ++i) {
      EXPECT_EQ(wf.tokenizer->tokens[i], i < 200 ? vocab->tokens[i] : "") << i;
    }
    EXPECT_EQ(wf.tokenizer->merges, vocab->merges);
    EXPECT_EQ(wf.tokenizer->added_tokens, vocab->added_tokens);
    EXPECT_EQ(wf.tokenizer->normalizer, vocab->normalizer);
    const gguf::File f = gguf::Parse(gguf, "t.gguf");
    EXPECT_EQ(f.GetString("tokenizer.ggml.model"), std::string(kind) == "world" ? "rwkv" : "gpt2");
    EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[0],
              std::string(kind) == "world" ? "<s>" : "<|endoftext|>");
    EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[250], "[PAD250]");
    EXPECT_EQ(f.GetIntArray("tokenizer.ggml.token_type")[250], gguf::kTokenUnused);
    // Stable through a second conversion.
    EXPECT_EQ(ConvertBytes(gguf, "t.gguf", std::nullopt, wf.tokenizer), gguf);
  }
  auto too_big = SyntheticVocab("world", 300);
  EXPECT_THROW(ConvertBytes(bin, m, std::nullopt, too_big), Error);
}

// The real vocabularies through GGUF and back, on a model widened to their size: the same
// TokenizerData, and the same ids for a text.
TEST(GgufTokenizer, RealVocabulariesSurviveGguf) {
  const std::string world = "tokenizers/rwkv_vocab_v20230424.txt";
  const std::string neox = "tokenizers/20B_tokenizer.json";
  const char* m = "models/tiny-rwkv-7v0-834K-FP16.bin";
  REQUIRE_SHARED(world);
  REQUIRE_SHARED(neox);
  REQUIRE_SHARED(m);
  const std::vector<uint8_t> bin = ReadFileBytes(SharedPath(m));
  const std::string text =
      "Hello world! \xe4\xbd\xa0\xe5\xa5\xbd, the quick\n\nbrown fox's \"quotes\" 123456 "
      "\\ back\tslash <|endoftext|>   spaces    end\xff";
  for (const bool is_world : {true, false}) {
    SCOPED_TRACE(is_world ? world : neox);
    const TokenizerData data =
        is_world ? ReadWorldVocab(SharedPath(world)) : ReadTokenizerJson(SharedPath(neox));
    const int V = is_world ? 65536 : 50277;
    // The tiny model with V rows of embedding and head (zeros: only the vocabulary matters).
    WeightFile wf = ReadWeightFile(bin, m);
    const auto model = Model::LoadFromMemory(bin, m);
    ModelInfo info = model->info();
    info.n_vocab = V;
    wf.owned.emplace_back(StorageBytes(DType::kF16, int64_t{V} * info.n_embd), 0);
    for (const char* name : {"emb.weight", "head.weight"}) {
      Tensor& t = wf.tensors.at(name);
      t.type = DType::kF16;
      t.shape = {V, info.n_embd};
      t.data = wf.owned.back().data();
      t.nbytes = wf.owned.back().size();
    }
    GgufWriteOptions options;
    options.tokenizer = std::make_shared<TokenizerData>(data);
    const std::string path = TempPath("vocab.gguf");
    WriteGguf(wf, info, options, path);
    const std::vector<uint8_t> gguf = ReadAll(path);
    std::remove(path.c_str());
    const WeightFile back = ReadGguf(gguf, "vocab.gguf");
    ASSERT_NE(back.tokenizer, nullptr);
    std::vector<std::string> want = data.tokens;
    want.resize(V);  // padded
    EXPECT_EQ(back.tokenizer->kind, data.kind);
    EXPECT_EQ(back.tokenizer->tokens, want);
    EXPECT_EQ(back.tokenizer->merges, data.merges);
    EXPECT_EQ(back.tokenizer->added_tokens, data.added_tokens);
    EXPECT_EQ(back.tokenizer->normalizer, data.normalizer);
    EXPECT_EQ(MakeTokenizer(*back.tokenizer)->Encode(text), MakeTokenizer(data)->Encode(text));
    const gguf::File f = gguf::Parse(gguf, "vocab.gguf");
    EXPECT_EQ(f.GetString("tokenizer.ggml.model"), is_world ? "rwkv" : "gpt2");
    if (is_world) {
      EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[0], "<s>");
      EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[1], "\\x00");
      EXPECT_EQ(f.GetUint("tokenizer.ggml.eot_token_id"), 261u);
      EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[65535], "[PAD65535]");
    } else {
      EXPECT_EQ(f.GetIntArray("tokenizer.ggml.token_type")[0], gguf::kTokenControl);
      EXPECT_EQ(f.GetIntArray("tokenizer.ggml.token_type")[50276], gguf::kTokenUserDefined);
      EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")[50276], "  ");
      EXPECT_EQ(f.GetString("aviary.tokenizer.normalizer"), "NFC");
    }
  }
}

// ---- Malformed files ----

class GgufMalformed : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_SHARED(kModel);
    valid_ = ConvertBytes(ReadFileBytes(SharedPath(kModel)), kModel, DType::kQ4_0);
    file_ = std::make_unique<gguf::File>(gguf::Parse(valid_, "valid.gguf"));
  }

  // Loading must throw aviary::Error starting with the file name (and not crash).
  void ExpectError(const std::vector<uint8_t>& bytes, const std::string& needle = "") {
    try {
      Model::LoadFromMemory(bytes, "bad.gguf");
      ADD_FAILURE() << "loaded without an error; expected '" << needle << "'";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind("bad.gguf: ", 0), 0u) << what;
      if (!needle.empty()) {
        EXPECT_NE(what.find(needle), std::string::npos) << what;
      }
    }
  }
  GgufBuilder Builder() const { return GgufBuilder::From(*file_); }

  static constexpr const char* kModel = "models/stress/stress-rwkv-7v0-FP32.bin";
  std::vector<uint8_t> valid_;
  std::unique_ptr<gguf::File> file_;
};

TEST_F(GgufMalformed, BuilderReproducesTheValidFile) {
  EXPECT_EQ(Builder().Build(), valid_);
  EXPECT_NO_THROW(Model::LoadFromMemory(valid_, "valid.gguf"));
}

TEST_F(GgufMalformed, TruncatedAnywhere) {
  const size_t header = file_->data_offset;
  size_t data_end = 0;  // the padding after the last tensor is not needed
  for (const gguf::TensorInfo& t : file_->tensors) {
    data_end = std::max<size_t>(data_end, header + t.offset + t.nbytes);
  }
  std::vector<size_t> cuts;
  for (size_t n = 0; n < std::min<size_t>(header, 600); ++n) cuts.push_back(n);
  for (size_t n = 600; n < header; n += 97) cuts.push_back(n);
  for (size_t n = header; n < data_end; n += data_end / 50) cuts.push_back(n);
  cuts.push_back(data_end - 1);
  for (size_t n : cuts) {
    SCOPED_TRACE(n);
    ExpectError(std::vector<uint8_t>(valid_.begin(), valid_.begin() + n));
  }
}

TEST_F(GgufMalformed, LyingHeaderCounts) {
  GgufBuilder b = Builder();
  b.n_tensors_override = uint64_t{1} << 60;
  ExpectError(b.Build(), "tensors but only");
  b = Builder();
  b.n_kv_override = ~uint64_t{0};
  ExpectError(b.Build(), "metadata entries but only");
  b = Builder();
  b.n_kv_override = b.kvs.size() + 1;  // reads the first tensor info as a key
  ExpectError(b.Build());
  b = Builder();
  b.n_tensors_override = b.tensors.size() - 1;  // one tensor goes missing
  ExpectError(b.Build());
}

TEST_F(GgufMalformed, LyingLengths) {
  std::vector<uint8_t> bytes = valid_;
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(&bytes[24], &huge, 8);  // the first key's length
  ExpectError(bytes, "length");
  GgufBuilder b = Builder();
  std::vector<uint8_t> p;
  GgufBuilder::Put<uint32_t>(p, 9);  // array
  GgufBuilder::Put<uint32_t>(p, 8);  // of strings
  GgufBuilder::Put<uint64_t>(p, uint64_t{1} << 59);
  b.Set("tokenizer.ggml.tokens", p);
  ExpectError(b.Build(), "claims");
  b = Builder();
  p.clear();
  GgufBuilder::Put<uint32_t>(p, 9);
  GgufBuilder::Put<uint32_t>(p, 6);  // of f32
  GgufBuilder::Put<uint64_t>(p, ~uint64_t{0} / 2);
  b.Set("x.floats", p);
  ExpectError(b.Build(), "claims");
  b = Builder();
  p.clear();
  GgufBuilder::Put<uint32_t>(p, 8);
  GgufBuilder::Put<uint64_t>(p, ~uint64_t{0});  // a string longer than the file
  b.Set("x.string", p);
  ExpectError(b.Build(), "larger than");
}

TEST_F(GgufMalformed, BadShapesTypesAndOffsets) {
  auto mutate = [&](const std::function<void(GgufBuilder&)>& f, const std::string& needle) {
    GgufBuilder b = Builder();
    f(b);
    SCOPED_TRACE(needle);
    ExpectError(b.Build(), needle);
  };
  const std::string key = "blk.0.time_mix_key.weight";
  mutate(
      [&](GgufBuilder& b) {
        b.FindTensor(key)->ne = {128, uint64_t{1} << 40};
      },
      "shape larger than the file");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->ne = {128, ~uint64_t{0}}; }, "dimension");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->ne = {128, 0}; }, "dimension 1 is 0");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->ne = {}; }, "dimension count 0");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->ne = {128, 128, 1, 1, 1}; }, "dimension count 5");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->ne = {64, 256}; }, "has shape");  // model check
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->type = 10; }, "Q2_K");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->type = 12; },
         "not a multiple of the Q4_K block size");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->type = 1000; }, "type 1000");
  mutate([&](GgufBuilder& b) { b.FindTensor("blk.0.time_mix_r_k.weight")->ne = {100}; },
         "elements");
  mutate(
      [&](GgufBuilder& b) {
        b.FindTensor("token_embd_norm.weight")->type = 2;
        b.FindTensor("token_embd_norm.weight")->ne = {100};
      },
      "not a multiple of the Q4_0 block size");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->offset = 3; }, "not a multiple of the alignment");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->offset = uint64_t{1} << 40; },
         "runs past the end");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->offset = ~uint64_t{0} - 31; },
         "runs past the end");
  mutate([&](GgufBuilder& b) { b.tensors[1].name = b.tensors[0].name; }, "appears twice");
  mutate([&](GgufBuilder& b) { b.FindTensor(key)->name = "blk.0.time_mix_kee.weight"; },
         "missing tensor 'blk.0.time_mix_key.weight'");
  mutate([&](GgufBuilder& b) { b.tensors.erase(b.tensors.begin()); },
         "missing tensor 'token_embd.weight'");
  mutate(
      [&](GgufBuilder& b) {
        b.tensors.push_back(b.tensors[0]);
        b.tensors.back().name = "extra.weight";
      },
      "unexpected tensor 'extra.weight'");
  mutate([&](GgufBuilder& b) { b.tensors.back().name = std::string(2000, 'x'); }, "larger than");
}

// An unsupported tensor type is named once: by its ggml name and number, or by its number.
TEST_F(GgufMalformed, UnsupportedTypeNamedOnce) {
  GgufBuilder b = Builder();
  b.FindTensor("blk.0.time_mix_key.weight")->type = 1000;
  ExpectError(b.Build(), "has ggml type 1000, which aviary does not read");
  b = Builder();
  b.FindTensor("blk.0.time_mix_key.weight")->type = 10;
  ExpectError(b.Build(), "has type Q2_K (ggml type 10), which aviary does not read");
}

TEST_F(GgufMalformed, BadMetadata) {
  auto mutate = [&](const std::function<void(GgufBuilder&)>& f, const std::string& needle) {
    GgufBuilder b = Builder();
    f(b);
    SCOPED_TRACE(needle);
    ExpectError(b.Build(), needle);
  };
  mutate([](GgufBuilder& b) { b.version = 1; }, "version 1");
  mutate([](GgufBuilder& b) { b.version = 4; }, "version 4");
  mutate([](GgufBuilder& b) { b.version = 0x03000000; }, "big-endian");
  mutate([](GgufBuilder& b) { b.Set("general.architecture", GgufBuilder::Str("llama")); },
         "'llama'");
  mutate([](GgufBuilder& b) { b.Remove("general.architecture"); },
         "missing key 'general.architecture'");
  mutate([](GgufBuilder& b) { b.Set("general.architecture", GgufBuilder::U32(7)); },
         "expected a string");
  mutate([](GgufBuilder& b) { b.Remove("rwkv7.block_count"); }, "missing key 'rwkv7.block_count'");
  mutate([](GgufBuilder& b) { b.Set("rwkv7.block_count", GgufBuilder::U32(4)); },
         "missing tensor 'blk.3.");
  mutate([](GgufBuilder& b) { b.Set("rwkv7.block_count", GgufBuilder::U32(2)); },
         "unexpected tensor 'blk.2.");
  mutate([](GgufBuilder& b) { b.Set("rwkv7.block_count", GgufBuilder::U32(1u << 31)); },
         "implausible");
  mutate([](GgufBuilder& b) { b.Set("rwkv7.embedding_length", GgufBuilder::U32(64)); },
         "must hold 6 rows of 64");
  mutate([](GgufBuilder& b) { b.Set("rwkv7.wkv.head_size", GgufBuilder::U32(48)); },
         "does not divide");
  mutate([](GgufBuilder& b) { b.Set("rwkv7.wkv.head_size", GgufBuilder::U32(0)); },
         "does not divide");
  mutate([](GgufBuilder& b) { b.kvs.push_back(b.kvs[0]); }, "appears twice");
  mutate([](GgufBuilder& b) { b.Set("general.alignment", GgufBuilder::U32(0)); }, "power of two");
  mutate([](GgufBuilder& b) { b.Set("general.alignment", GgufBuilder::U32(48)); }, "power of two");
  mutate([](GgufBuilder& b) { b.Set("general.alignment", GgufBuilder::U64(32)); }, "expected u32");
  mutate([](GgufBuilder& b) { b.Set("general.alignment", GgufBuilder::U32(1024)); },
         "not a multiple of the alignment 1024");
  mutate([](GgufBuilder& b) { b.Set("x.bad", {13, 0, 0, 0}); }, "unknown value type 13");
  mutate([](GgufBuilder& b) { b.Set("x.bad", {7, 0, 0, 0, 2}); }, "bool with value 2");
  mutate(
      [](GgufBuilder& b) {
        b.Set("x.nested", {9, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
      },
      "array of arrays");
  mutate([](GgufBuilder& b) { b.Set("", GgufBuilder::U32(1)); }, "empty");
  mutate([](GgufBuilder& b) { b.Set("tokenizer.ggml.tokens", GgufBuilder::StrArray({"a\\"})); },
         "token_type");
  mutate(
      [](GgufBuilder& b) {
        std::vector<std::string> t(256, "a");
        t[3] = "bad\\x4";
        b.Set("tokenizer.ggml.tokens", GgufBuilder::StrArray(t));
      },
      "malformed escape");
  mutate(
      [](GgufBuilder& b) {
        b.Remove("tokenizer.ggml.token_type");
        b.Set("tokenizer.ggml.tokens", GgufBuilder::StrArray(std::vector<std::string>(300, "a")));
      },
      "tokenizer has 300 tokens");
  mutate([](GgufBuilder& b) { b.Set("tokenizer.ggml.tokens", GgufBuilder::U32(1)); },
         "not an array of strings");
}

// Random byte flips in the header: never a crash, only errors (or a valid load).
TEST_F(GgufMalformed, RandomCorruptionNeverCrashes) {
  std::mt19937 rng(3);
  const size_t header = file_->data_offset;
  for (int i = 0; i < 300; ++i) {
    std::vector<uint8_t> bytes = valid_;
    for (int k = 0; k < 1 + i % 4; ++k) {
      const size_t at = rng() % header;
      bytes[at] = static_cast<uint8_t>(rng());
    }
    try {
      auto m = Model::LoadFromMemory(bytes, "bad.gguf");
      State s = m->NewState();
      std::vector<float> logits;
      m->Eval(std::vector<int32_t>{1, 2}, s, &logits);
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("bad.gguf: ", 0), 0u) << e.what();
    }
  }
}

// ---- The commands ----

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}
std::string Cli(const std::string& args) { return Quote(CliPath()) + " " + args + " 2>&1"; }

TEST(GgufCli, ConvertAndQuantize) {
  const char* m = "models/tiny-rwkv-7v0-834K-FP32.bin";
  REQUIRE_SHARED(m);
  const std::string in = SharedPath(m);
  const std::string out = TempPath("cli.gguf"), q = TempPath("cli-q4_0.gguf");
  std::remove(out.c_str());
  CommandResult r = RunCommand(Cli("convert " + Quote(in) + " " + Quote(out)));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("architecture rwkv7"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tokenizer: bytes, 256 tokens"), std::string::npos) << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex(R"(size: +\d+ -> \d+ bytes)"))) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out + ".tmp"));
  r = RunCommand(Cli("info --model " + Quote(out)));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("GGUF v3 (rwkv7)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("RWKV v7.0"), std::string::npos) << r.output;

  r = RunCommand(Cli("quantize " + Quote(out) + " " + Quote(q) + " Q4_0"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Q4_0 x"), std::string::npos) << r.output;
  EXPECT_LT(std::filesystem::file_size(q), std::filesystem::file_size(out));
  // Logits of the GGUF equal the .bin's; the quantized ones are close.
  const auto a = Model::Load(in);
  const auto b = Model::Load(out);
  const auto c = Model::Load(q);
  EXPECT_EQ(Logits(*a, LongPrompt()), Logits(*b, LongPrompt()));
  EXPECT_LT(MaxAbsDiff(Logits(*a, LongPrompt()), Logits(*c, LongPrompt())), 1.5);
  // GGUF -> GGUF with the same types: the same bytes.
  const std::string again = TempPath("cli-again.gguf");
  r = RunCommand(Cli("convert " + Quote(out) + " " + Quote(again)));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ReadAll(again), ReadAll(out));
  for (const std::string& p : {out, q, again}) std::remove(p.c_str());
}

TEST(GgufCli, Errors) {
  const char* m = "models/stress/stress-rwkv-5v2-FP16.bin";
  REQUIRE_SHARED(m);
  const std::string in = SharedPath(m);
  const std::string out = TempPath("err.gguf");
  // Usage errors: exit 2, one line.
  for (const std::string& args :
       {std::string("convert"), "convert " + Quote(in), "quantize " + Quote(in) + " " + Quote(out),
        "quantize " + Quote(in) + " " + Quote(out) + " q3_k",
        "convert " + Quote(in) + " " + Quote(out) + " --type int8"}) {
    const CommandResult r = RunCommand(Cli(args));
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("aviary: ", 0), 0u) << r.output;
  }
  // Refuses to overwrite its input (also through another path to it).
  const std::string copy = TempPath("input-copy.bin");
  std::filesystem::copy_file(in, copy, std::filesystem::copy_options::overwrite_existing);
  const std::vector<uint8_t> before = ReadAll(copy);
  for (const std::string& target : {copy, ProcessTempDir() + "./" + "aviary_gguf_input-copy.bin"}) {
    const CommandResult r = RunCommand(Cli("convert " + Quote(copy) + " " + Quote(target)));
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("refusing to overwrite the input"), std::string::npos) << r.output;
  }
  EXPECT_EQ(ReadAll(copy), before);
  // Bad input: exit 1 naming the file; nothing left behind.
  WriteAll(copy, std::vector<uint8_t>(before.begin(), before.begin() + 1000));
  CommandResult r = RunCommand(Cli("convert " + Quote(copy) + " " + Quote(out)));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(copy + ": "), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_FALSE(std::filesystem::exists(out + ".tmp"));
  r = RunCommand(Cli("convert /nonexistent/model.bin " + Quote(out)));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/model.bin"), std::string::npos) << r.output;
  // A tokenizer file that is not there.
  r = RunCommand(
      Cli("convert " + Quote(in) + " " + Quote(out) + " --tokenizer /nonexistent/vocab.txt"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out));
  // Unwritable output.
  r = RunCommand(Cli("convert " + Quote(in) + " /nonexistent-dir/out.gguf"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("/nonexistent-dir/out.gguf.tmp: cannot create"), std::string::npos)
      << r.output;
  std::remove(copy.c_str());
}

}  // namespace
}  // namespace aviary::testing
