// Finetuning's import (src/train/import.cpp): every RWKV-7 file aviary loads, in every container
// and weight type, becomes a config and a flat parameter buffer that, exported as a .pth
// (train/export.cpp), gives the logits of the original file (float activations). Other
// versions, and files whose low-rank widths differ between layers, are refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/gguf_writer.h"
#include "formats/mapped_file.h"
#include "formats/pth_writer.h"
#include "formats/weight_file.h"
#include "test_data.h"
#include "train/export.h"
#include "train/import.h"

namespace aviary {
namespace {

using testing::F32Logits;
using testing::ProcessTempDir;
using testing::SharedPath;

const std::vector<int32_t> kPrompt = {0x22, 0x69, 0x6e, 32, 116, 104, 101, 10, 200, 0, 255, 65};

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

// The file converted to GGUF as `aviary convert` does (nullopt: every tensor keeps its type).
std::string ToGguf(const std::string& in, std::optional<DType> type, const std::string& out) {
  auto file = std::make_shared<MappedFile>(in);
  WeightFile wf = ReadWeightFile(file->bytes(), in);
  wf.backing = file;
  const auto model = Model::LoadFromMemory(file->bytes(), in);
  GgufWriteOptions options;
  options.type = type;
  WriteGguf(wf, model->info(), options, out);
  return out;
}

// import -> ExportRwkv7Pth -> load: the logits of the original, within `tolerance` (0: exact).
void ExpectSameModel(const std::string& path, double tolerance) {
  SCOPED_TRACE(path);
  const train::ImportedRwkv7 imported = train::LoadRwkv7Params(path);
  const std::string pth = ProcessTempDir() + "imported.pth";
  train::ExportRwkv7Pth(pth, imported.layout, imported.params.data());
  const std::vector<float> want = F32Logits(path, kPrompt), got = F32Logits(pth, kPrompt);
  const double diff = MaxAbsDiff(want, got);
  std::printf("%s: max |logit difference| %.3g\n", path.c_str(), diff);
  EXPECT_LE(diff, tolerance);
}

TEST(Rwkv7Import, ReadsTheStressModelsSizes) {
  REQUIRE_SHARED("models/stress/stress-rwkv-7v0-FP32.bin");
  const auto imported =
      train::LoadRwkv7Params(SharedPath("models/stress/stress-rwkv-7v0-FP32.bin"));
  const train::Rwkv7Config& c = imported.layout.config();
  EXPECT_EQ(c.n_layer, 3);
  EXPECT_EQ(c.n_embd, 128);
  EXPECT_EQ(c.head_size, 64);
  EXPECT_EQ(c.vocab, 256);
  EXPECT_EQ(c.n_ffn, 448);
  EXPECT_GT(c.d_decay, 0);
  EXPECT_GT(c.d_mv, 0);
  EXPECT_EQ(imported.params.size(), imported.layout.total_floats());
  // Layer 0's unused value-residual tensors: v0 as RWKV-LM initialises it, v1 and v2 zero.
  const float* p = imported.params.data();
  const auto& v0 = imported.layout.Get("blocks.0.att.v0");
  EXPECT_FLOAT_EQ(p[v0.offset], 0.73f + 0.2f);
  EXPECT_FLOAT_EQ(p[v0.offset + 127], 0.73f - 0.2f);
  for (const char* name : {"blocks.0.att.v1", "blocks.0.att.v2"}) {
    const auto& e = imported.layout.Get(name);
    for (size_t i = 0; i < e.size; ++i) ASSERT_EQ(p[e.offset + i], 0.0f) << name;
  }
}

TEST(Rwkv7Import, FloatFilesGiveTheSameLogits) {
  for (const char* file :
       {"models/stress/stress-rwkv-7v0-FP32.bin", "models/tiny-rwkv-7v0-834K-FP32.bin",
        "models/pth/tiny-rwkv-7v0-834K-fp32.pth",
        "models/pth/tiny-rwkv-7v0-834K-fp32.safetensors"}) {
    REQUIRE_SHARED(file);
    ExpectSameModel(SharedPath(file), 0.0);
  }
  const std::string gguf = ToGguf(SharedPath("models/stress/stress-rwkv-7v0-FP32.bin"),
                                  std::nullopt, ProcessTempDir() + "stress-f32.gguf");
  ExpectSameModel(gguf, 0.0);
}

// F16, BF16 and quantized weights are widened exactly. With float activations the kernels widen
// each weight and sum as the F32 kernel does (identical logits on AVX-512); the bound leaves
// room for a kernel that sums a block format in another order.
TEST(Rwkv7Import, WidenedFilesGiveTheSameLogits) {
  for (const char* file :
       {"models/stress/stress-rwkv-7v0-FP16.bin", "models/tiny-rwkv-7v0-834K-FP16.bin",
        "models/tiny-rwkv-7v0-834K-Q5_1.bin", "models/pth/tiny-rwkv-7v0-834K-bf16.pth",
        "models/pth/tiny-rwkv-7v0-834K-bf16.safetensors"}) {
    REQUIRE_SHARED(file);
    ExpectSameModel(SharedPath(file), 1e-5);
  }
  const std::string gguf = ToGguf(SharedPath("models/stress/stress-rwkv-7v0-FP32.bin"),
                                  DType::kQ8_0, ProcessTempDir() + "stress-q8_0.gguf");
  ExpectSameModel(gguf, 1e-5);
}

TEST(Rwkv7Import, RefusesOtherVersions) {
  for (const char* file : {"models/tiny-rwkv-6v0-1m-FP32.bin", "models/tiny-rwkv-5v2-730K-FP32.bin",
                           "models/tiny-rwkv-4v0-660K-FP32.bin"}) {
    REQUIRE_SHARED(file);
    const std::string path = SharedPath(file);
    try {
      train::LoadRwkv7Params(path);
      ADD_FAILURE() << "no error for " << path;
    } catch (const Error& e) {
      const std::string version = std::string(file).find("6v0") != std::string::npos   ? "RWKV-6"
                                  : std::string(file).find("5v2") != std::string::npos ? "RWKV-5.2"
                                                                                       : "RWKV-4";
      EXPECT_EQ(std::string(e.what()),
                "aviary train works on RWKV-7 models; " + path + " is " + version);
    }
  }
}

TEST(Rwkv7Import, RefusesLowRankWidthsThatDifferBetweenLayers) {
  // A 2-layer model whose layer 1 has a wider decay low-rank pair than layer 0: inference runs
  // it, the flat layout cannot hold it.
  const auto layout = train::ParamLayout::Rwkv7(train::Rwkv7Config::Official(2, 64, 256));
  std::vector<float> params(layout.total_floats(), 0.1f);
  const std::string pth = ProcessTempDir() + "uneven.pth";
  train::ExportRwkv7Pth(pth, layout, params.data());
  std::vector<PthTensor> tensors;
  std::vector<float> wide(64 * 96, 0.01f);
  for (const train::ParamEntry& e : layout.entries()) {
    if (e.name == "blocks.1.att.w1") {
      tensors.push_back({e.name, {64, 96}, wide.data()});
    } else if (e.name == "blocks.1.att.w2") {
      tensors.push_back({e.name, {96, 64}, wide.data()});
    } else {
      tensors.push_back({e.name, e.pth_shape, params.data() + e.offset});
    }
  }
  WritePth(pth, tensors);
  ASSERT_NO_THROW(Model::Load(pth));
  try {
    train::LoadRwkv7Params(pth);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(pth + ": ", 0), 0u) << what;
    EXPECT_NE(what.find("blocks.1.att.w1"), std::string::npos) << what;
    EXPECT_NE(what.find("low-rank"), std::string::npos) << what;
  }
}

TEST(Rwkv7Import, RefusesFilesThatAreNotModels) {
  const std::string path = ProcessTempDir() + "not-a-model.pth";
  std::vector<float> v(4, 1.0f);
  const PthTensor t{"weight", {2, 2}, v.data()};
  WritePth(path, std::span<const PthTensor>(&t, 1));
  EXPECT_THROW(train::LoadRwkv7Params(path), Error);
  EXPECT_THROW(train::LoadRwkv7Params(ProcessTempDir() + "missing.pth"), Error);
}

}  // namespace
}  // namespace aviary
