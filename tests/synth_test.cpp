// Synthetic models (src/models/synth.h) and rwkv.cpp's writer (src/formats/rwkvcpp_writer.h):
// the files load back as the version asked for, give finite logits with a sane spread, and
// sequence mode equals one token at a time; the writer round-trips through the reader; the
// `synth` and `bench` commands work end to end.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/rwkvcpp_writer.h"
#include "formats/weight_file.h"
#include "models/model_impl.h"
#include "models/synth.h"
#include "tensor/dtype.h"
#include "tensor/quantize.h"
#include "tensor/bf16_matmul.h"
#include "tensor/int8_matmul.h"
#include "test_data.h"

namespace {

using aviary::Arch;
using aviary::DType;

std::string TempPath(const std::string& tag) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "_" + info->name() + "_" + tag;
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.') c = '_';
  }
  return ::testing::TempDir() + "aviary_synth_test_" + std::to_string(::getpid()) + "_" + name;
}

struct TempFile {
  explicit TempFile(std::string p) : path(std::move(p)) {}
  ~TempFile() { std::remove(path.c_str()); }
  std::string path;
};

TEST(RwkvCppWriter, RoundTripsThroughTheReader) {
  TempFile f(TempPath("rt.bin"));
  const int64_t rows = 3, cols = 64;
  std::vector<float> values(rows * cols);
  for (size_t i = 0; i < values.size(); ++i) values[i] = std::sin(0.37f * i) * 2.0f;
  const DType types[] = {DType::kF32,  DType::kF16,  DType::kQ4_0, DType::kQ4_1,
                         DType::kQ5_0, DType::kQ5_1, DType::kQ8_0};
  {
    aviary::RwkvCppWriter w(f.path, 100, 64, 1, DType::kQ5_1);
    for (DType t : types)
      w.AddTensor("m." + std::string(aviary::DTypeName(t)), {rows, cols}, t, values.data());
    w.AddTensor("v3d", {2, 1, 32}, DType::kF32, values.data());
    EXPECT_EQ(w.tensors(), 8);
    w.Finish();
  }
  const std::vector<uint8_t> bytes = aviary::testing::ReadFileBytes(f.path);
  const aviary::WeightFile wf = aviary::ReadRwkvCppBin(bytes, f.path);
  EXPECT_EQ(wf.n_vocab, 100);
  EXPECT_EQ(wf.n_embd, 64);
  EXPECT_EQ(wf.n_layer, 1);
  EXPECT_EQ(wf.main_type, DType::kQ5_1);
  EXPECT_EQ(wf.format, "rwkv.cpp ggmf v101");
  for (DType t : types) {
    const aviary::Tensor* tensor = wf.Find("m." + std::string(aviary::DTypeName(t)));
    ASSERT_NE(tensor, nullptr);
    EXPECT_EQ(tensor->type, t);
    EXPECT_EQ(tensor->shape, (std::vector<int64_t>{rows, cols}));
    std::vector<uint8_t> want(aviary::StorageBytes(t, rows * cols));
    for (int64_t r = 0; r < rows; ++r) {
      aviary::QuantizeRow(t, values.data() + r * cols, want.data() + r * tensor->row_bytes(), cols);
    }
    ASSERT_EQ(tensor->nbytes, want.size());
    EXPECT_EQ(std::memcmp(tensor->data, want.data(), want.size()), 0) << aviary::DTypeName(t);
  }
  const aviary::Tensor* v3 = wf.Find("v3d");
  ASSERT_NE(v3, nullptr);
  EXPECT_EQ(v3->shape, (std::vector<int64_t>{2, 1, 32}));
  EXPECT_EQ(std::memcmp(v3->data, values.data(), 64 * sizeof(float)), 0);
}

TEST(RwkvCppWriter, RefusesWhatRwkvCppCannotStore) {
  TempFile f(TempPath("bad.bin"));
  EXPECT_THROW(aviary::RwkvCppWriter(f.path, 10, 32, 1, DType::kBF16), aviary::Error);
  aviary::RwkvCppWriter w(f.path, 10, 32, 1, DType::kQ8_0);
  std::vector<float> v(40, 1.0f);
  EXPECT_THROW(w.AddTensor("x", {1, 40}, DType::kQ8_0, v.data()), aviary::Error);
  EXPECT_THROW(aviary::RwkvCppWriter("/nonexistent-dir/x.bin", 10, 32, 1, DType::kF32),
               aviary::Error);
}

struct SynthCase {
  const char* version;
  Arch arch;
  DType type;
};

class SynthModelTest : public ::testing::TestWithParam<SynthCase> {};

TEST_P(SynthModelTest, LoadsRunsAndAgreesWithItself) {
  const SynthCase& c = GetParam();
  aviary::SynthOptions o;
  o.arch = aviary::ParseArch(c.version);
  ASSERT_EQ(o.arch, c.arch);
  o.n_layer = 3;
  o.n_embd = 128;
  o.n_vocab = 300;
  o.head_size = 32;
  o.type = c.type;
  TempFile f(TempPath("model.bin"));
  const aviary::SynthReport report = aviary::WriteSynthModel(o, f.path);
  EXPECT_GT(report.file_bytes, 0u);
  EXPECT_EQ(static_cast<size_t>(report.tensors), aviary::PlanSynthModel(o).size());

  const auto model = aviary::Model::Load(f.path);
  const aviary::ModelInfo& info = model->info();
  EXPECT_EQ(info.arch, c.arch);
  EXPECT_EQ(info.n_layer, 3);
  EXPECT_EQ(info.n_embd, 128);
  EXPECT_EQ(info.n_vocab, 300);
  EXPECT_EQ(info.n_head, c.arch == Arch::kV4 ? 1 : 4);
  EXPECT_EQ(info.main_type, std::string(aviary::DTypeName(c.type)));
  EXPECT_EQ(info.file_size, report.file_bytes);
  EXPECT_EQ(info.n_params, report.n_params);
  if (aviary::IsQuantized(c.type)) {
    EXPECT_GT(info.tensor_types.at(std::string(aviary::DTypeName(c.type))), 0);
    EXPECT_GT(info.tensor_types.at("F16"), 0);  // emb and head stay F16, as rwkv.cpp leaves them
  }

  std::vector<int32_t> tokens;
  for (int i = 0; i < 50; ++i) tokens.push_back((i * 97 + 5) % 300);
  aviary::State seq_state = model->NewState();
  std::vector<float> seq;
  model->Eval(tokens, seq_state, &seq, /*all_positions=*/true);
  aviary::State one_state = model->NewState();
  std::vector<float> one, row;
  for (int32_t t : tokens) {
    model->Eval(std::span<const int32_t>(&t, 1), one_state, &row);
    one.insert(one.end(), row.begin(), row.end());
  }
  ASSERT_EQ(seq.size(), one.size());
  EXPECT_EQ(std::memcmp(seq.data(), one.data(), seq.size() * sizeof(float)), 0)
      << "sequence mode differs from one token at a time";
  EXPECT_TRUE(seq_state == one_state);

  // Finite logits with a sane spread (standard deviation per row between 0.3 and 30).
  for (size_t t = 0; t < tokens.size(); ++t) {
    double sum = 0, sq = 0;
    for (int v = 0; v < 300; ++v) {
      const float x = seq[t * 300 + v];
      ASSERT_TRUE(std::isfinite(x)) << "row " << t;
      sum += x;
      sq += static_cast<double>(x) * x;
    }
    const double mean = sum / 300, sd = std::sqrt(sq / 300 - mean * mean);
    EXPECT_GT(sd, 0.3) << "row " << t;
    EXPECT_LT(sd, 30.0) << "row " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(AllVersions, SynthModelTest,
                         ::testing::Values(SynthCase{"4", Arch::kV4, DType::kF16},
                                           SynthCase{"5.1", Arch::kV5_1, DType::kQ8_0},
                                           SynthCase{"5.2", Arch::kV5_2, DType::kQ5_1},
                                           SynthCase{"6", Arch::kV6, DType::kQ4_0},
                                           SynthCase{"7", Arch::kV7, DType::kF32},
                                           SynthCase{"7", Arch::kV7, DType::kQ8_0},
                                           SynthCase{"7", Arch::kV7, DType::kQ4_1},
                                           SynthCase{"v6.0", Arch::kV6, DType::kF16},
                                           SynthCase{"4", Arch::kV4, DType::kQ5_0}),
                         [](const ::testing::TestParamInfo<SynthCase>& i) {
                           std::string name = std::string("v") + i.param.version + "_" +
                                              std::string(aviary::DTypeName(i.param.type));
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

TEST(Synth, IsDeterministicAndFollowsRwkvCppTypePolicy) {
  aviary::SynthOptions o;
  o.arch = Arch::kV7;
  o.n_layer = 2;
  o.n_embd = 64;
  o.n_vocab = 100;
  o.type = DType::kQ5_0;
  TempFile a(TempPath("a.bin")), b(TempPath("b.bin"));
  aviary::WriteSynthModel(o, a.path);
  aviary::WriteSynthModel(o, b.path);
  EXPECT_EQ(aviary::testing::ReadFileBytes(a.path), aviary::testing::ReadFileBytes(b.path));
  for (const aviary::SynthTensor& t : aviary::PlanSynthModel(o)) {
    const bool big = t.name.find(".weight") != std::string::npos && t.shape.size() == 2;
    if (t.name == "emb.weight" || t.name == "head.weight" ||
        t.name.find(".w1") != std::string::npos) {
      EXPECT_EQ(t.type, DType::kF16) << t.name;
    } else if (big) {
      EXPECT_EQ(t.type, DType::kQ5_0) << t.name;
    } else if (t.shape.size() == 1 || t.name.find("x_rwkvag") != std::string::npos) {
      EXPECT_EQ(t.type, DType::kF32) << t.name;
    }
  }
  EXPECT_THROW(aviary::ParseArch("8"), aviary::UsageError);
  o.n_embd = 100;
  EXPECT_THROW(aviary::PlanSynthModel(o), aviary::UsageError);
}

// The scratch a sequence chunk needs must not grow with the number of layers: a helper that
// runs once per layer (the channel mix) has to reuse its blocks. Checked on a fresh thread (the
// scratch is per thread) for a version with and one without the channel mix's receptance.
TEST(Synth, ScratchDoesNotGrowWithLayers) {
  for (Arch arch : {Arch::kV7, Arch::kV4}) {
    size_t held[2] = {0, 0};
    const int layers[2] = {2, 5};
    for (int i = 0; i < 2; ++i) {
      aviary::SynthOptions o;
      o.arch = arch;
      o.n_layer = layers[i];
      o.n_embd = 128;
      o.n_vocab = 300;
      o.head_size = 32;
      o.type = DType::kF32;
      TempFile f(TempPath("layers" + std::to_string(layers[i]) + ".bin"));
      aviary::WriteSynthModel(o, f.path);
      const auto model = aviary::Model::Load(f.path);
      std::thread([&] {
        std::vector<int32_t> tokens(40);
        for (int t = 0; t < 40; ++t) tokens[t] = (t * 37 + 3) % 300;
        aviary::State state = model->NewState();
        std::vector<float> logits;
        model->Eval(tokens, state, &logits);
        held[i] = aviary::Scratch::ForThisThread().BytesHeld();
      }).join();
    }
    EXPECT_GT(held[0], 0u);
    EXPECT_EQ(held[0], held[1]) << "arch " << aviary::ArchName(arch) << ": 2 layers hold "
                                << held[0] << " bytes of scratch, 5 layers " << held[1];
  }
}

TEST(SynthCli, SynthThenBench) {
  TempFile f(TempPath("cli.bin"));
  const std::string cli = aviary::testing::CliPath();
  auto r = aviary::testing::RunCommand(cli +
                                       " synth --version 7 --layers 2 --embd 64 --vocab 512 "
                                       "--type q8_0 -o " +
                                       f.path + " 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("RWKV v7.0"), std::string::npos) << r.output;
  r = aviary::testing::RunCommand(
      cli + " bench --model " + f.path +
      " --threads 2 --prompt-tokens 20 --gen-tokens 5 --repeat 2 --json 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* key : {"\"prompt_tok_s\"", "\"gen_tok_s\"", "\"load_ms\"", "\"peak_rss_bytes\"",
                          "\"threads\": 2", "\"arch\": \"v7.0\""}) {
    EXPECT_NE(r.output.find(key), std::string::npos) << key << " in " << r.output;
  }
  // The activation modes are reported and follow AVIARY_ACTIVATIONS (int8 and bf16 only where
  // the CPU can; "int8" keeps F16/BF16 matrices in float, "f32" everything).
  const std::string want_int8 =
      aviary::int8::CpuSupported() ? "\"activations\": \"int8\"" : "\"activations\": \"f32\"";
  const std::string want_bf16 = aviary::bf16::CpuSupported() ? "\"activations_f16\": \"bf16\""
                                                             : "\"activations_f16\": \"f32\"";
  EXPECT_NE(r.output.find(want_int8), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(want_bf16), std::string::npos) << r.output;
  r = aviary::testing::RunCommand("AVIARY_ACTIVATIONS=f32 " + cli + " bench --model " + f.path +
                                  " --prompt-tokens 8 --gen-tokens 2 --repeat 1 --json 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"activations\": \"f32\""), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"activations_f16\": \"f32\""), std::string::npos) << r.output;
  r = aviary::testing::RunCommand("AVIARY_ACTIVATIONS=int8 " + cli + " bench --model " + f.path +
                                  " --prompt-tokens 8 --gen-tokens 2 --repeat 1 --json 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(want_int8), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"activations_f16\": \"f32\""), std::string::npos) << r.output;
  r = aviary::testing::RunCommand(cli + " bench --model " + f.path +
                                  " --prompt-tokens 8 --gen-tokens 2 --repeat 1 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("generation:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("activations for quantized matrices"), std::string::npos) << r.output;
  r = aviary::testing::RunCommand(cli + " synth --version 9 -o " + f.path + " 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = aviary::testing::RunCommand(cli + " synth --type bf16 -o " + f.path + " 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = aviary::testing::RunCommand(cli + " bench --model " + f.path + " --repeat 0 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

}  // namespace
