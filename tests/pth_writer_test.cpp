// The .pth writer (src/formats/pth_writer.cpp) and the RWKV-7 exports (src/train/export.cpp):
//  - written files read back with aviary's zip and pickle readers, bit for bit (F32; BF16 as
//    round-to-nearest-even of the floats), with every data record 64-byte aligned and every CRC
//    right, for odd shapes, scalars, empty tensors, thousands of tensors and ZIP64 records;
//  - torch.load (Debian's /usr/bin/python3 with python3-torch, weights_only=True: only the
//    globals a plain state dict needs) returns the same names, shapes, types and values;
//    without torch this FAILS in CI (CI=true) and skips elsewhere;
//  - an exported random RWKV-7 loads as a model, and its GGUF conversion gives the same logits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/pickle.h"
#include "formats/pth_writer.h"
#include "formats/weight_file.h"
#include "formats/zip.h"
#include "test_data.h"
#include "train/export.h"
#include "train/params.h"

namespace aviary {
namespace {

using testing::F32Logits;
using testing::ProcessTempDir;
using testing::ReadFileBytes;

struct Source {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<Source> RandomTensors(const std::vector<std::vector<int64_t>>& shapes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Source> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    Source s{"t", shapes[i], {}};
    s.name += std::to_string(i);  // (appended: GCC 12's -Wrestrict misfires on "t" + string)
    s.values.resize(static_cast<size_t>(Numel(shapes[i])));
    for (float& v : s.values) v = normal(rng);
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<PthTensor> Views(const std::vector<Source>& sources) {
  std::vector<PthTensor> v;
  for (const Source& s : sources) v.push_back({s.name, s.shape, s.values.data()});
  return v;
}

// Round to nearest even, NaN kept quiet: what torch's .bfloat16() does, written out here
// independently of the writer's QuantizeRow.
uint16_t ExpectedBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  const uint32_t lower = u & 0xffff, upper = u >> 16;
  const bool round_up = lower > 0x8000 || (lower == 0x8000 && (upper & 1));
  return static_cast<uint16_t>(upper + (round_up ? 1 : 0));
}

struct ReadTensor {
  std::string name;
  pickle::StorageType type;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Reads a .pth with aviary's zip and pickle readers (not ReadPth: these tensors are not a model),
// checking what torch relies on: data records 64-byte aligned, CRCs, contiguous tensors.
std::vector<ReadTensor> ReadBack(const std::string& path) {
  const std::vector<uint8_t> bytes = ReadFileBytes(path);
  const zip::Archive archive(bytes, path);
  for (const zip::Entry& e : archive.entries()) {
    EXPECT_EQ(e.method, 0) << e.name;
    EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
    std::vector<uint8_t> scratch;
    archive.Read(e, &scratch, /*check_crc=*/true);
  }
  const zip::Entry* pkl = archive.Find("archive/data.pkl");
  EXPECT_NE(pkl, nullptr);
  EXPECT_NE(archive.Find("archive/version"), nullptr);
  std::vector<uint8_t> scratch;
  std::vector<ReadTensor> out;
  for (const auto& [name, rec] : pickle::ReadStateDict(archive.Read(*pkl, &scratch, true), path)) {
    const zip::Entry* data = archive.Find("archive/data/" + rec.storage_key);
    EXPECT_NE(data, nullptr) << name;
    if (!data) continue;
    const int64_t esize = pickle::StorageElementSize(rec.type);
    EXPECT_EQ(rec.storage_offset, 0);
    EXPECT_EQ(rec.storage_numel, Numel(rec.shape));
    EXPECT_EQ(data->uncompressed_size, static_cast<uint64_t>(rec.storage_numel * esize));
    int64_t stride = 1;
    for (size_t i = rec.shape.size(); i-- > 0;) {
      EXPECT_EQ(rec.strides[i], stride) << name;
      stride *= rec.shape[i];
    }
    const auto span = archive.Read(*data, &scratch, false);
    out.push_back({name, rec.type, rec.shape, std::vector<uint8_t>(span.begin(), span.end())});
  }
  return out;
}

void ExpectSameTensors(const std::vector<Source>& sources, const std::vector<ReadTensor>& got,
                       DType type) {
  ASSERT_EQ(got.size(), sources.size());
  for (size_t i = 0; i < sources.size(); ++i) {
    const Source& s = sources[i];
    SCOPED_TRACE(s.name);
    EXPECT_EQ(got[i].name, s.name);
    EXPECT_EQ(got[i].shape, s.shape);
    if (type == DType::kF32) {
      EXPECT_EQ(got[i].type, pickle::StorageType::kFloat);
      ASSERT_EQ(got[i].bytes.size(), s.values.size() * 4);
      if (!got[i].bytes.empty()) {  // an empty tensor's buffers may be null: memcmp's UB
        EXPECT_EQ(0, std::memcmp(got[i].bytes.data(), s.values.data(), got[i].bytes.size()));
      }
    } else {
      EXPECT_EQ(got[i].type, pickle::StorageType::kBFloat16);
      ASSERT_EQ(got[i].bytes.size(), s.values.size() * 2);
      for (size_t j = 0; j < s.values.size(); ++j) {
        uint16_t h;
        std::memcpy(&h, got[i].bytes.data() + 2 * j, 2);
        ASSERT_EQ(h, ExpectedBf16(s.values[j])) << "element " << j << " = " << s.values[j];
      }
    }
  }
}

const std::vector<std::vector<int64_t>> kOddShapes = {
    {}, {1}, {7}, {3, 5}, {1, 1, 13}, {2, 3, 4, 5}, {0}, {4, 0, 2}, {257, 3}, {1, 1000}};

TEST(PthWriter, F32RoundTripWithOurReader) {
  const std::vector<Source> src = RandomTensors(kOddShapes, 1);
  const std::string path = ProcessTempDir() + "f32.pth";
  WritePth(path, Views(src));
  ExpectSameTensors(src, ReadBack(path), DType::kF32);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(PthWriter, Bf16RoundsToNearestEven) {
  std::vector<Source> src = RandomTensors(kOddShapes, 2);
  // Ties both ways, the largest finite values, infinities, NaN, subnormals, signed zero.
  auto bits = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  src.push_back(
      {"special",
       {12},
       {bits(0x3f808000), bits(0x3f818000), bits(0x3f808001), bits(0x7f7fffff), INFINITY, -INFINITY,
        NAN, bits(0x00000001), bits(0x807fffff), -0.0f, 1.0f, bits(0x3f80ffff)}});
  const std::string path = ProcessTempDir() + "bf16.pth";
  PthWriteOptions options;
  options.type = DType::kBF16;
  WritePth(path, Views(src), options);
  ExpectSameTensors(src, ReadBack(path), DType::kBF16);
}

TEST(PthWriter, ManyTensorsAndZip64Records) {
  std::vector<std::vector<int64_t>> shapes;
  for (int i = 0; i < 2500; ++i) shapes.push_back({i % 7 + 1, i % 3 + 1});  // > 2 SETITEMS batches
  const std::vector<Source> src = RandomTensors(shapes, 3);
  for (bool zip64 : {false, true}) {
    const std::string path = ProcessTempDir() + "many" + std::to_string(zip64) + ".pth";
    PthWriteOptions options;
    options.zip64_always = zip64;
    WritePth(path, Views(src), options);
    ExpectSameTensors(src, ReadBack(path), DType::kF32);
  }
}

TEST(PthWriter, SameTensorsGiveTheSameBytes) {
  const std::vector<Source> src = RandomTensors(kOddShapes, 4);
  const std::string a = ProcessTempDir() + "same-a.pth", b = ProcessTempDir() + "same-b.pth";
  WritePth(a, Views(src));
  WritePth(b, Views(src));
  EXPECT_EQ(ReadFileBytes(a), ReadFileBytes(b));
}

TEST(PthWriter, RefusesBadInputAndLeavesNoFile) {
  const std::vector<Source> src = RandomTensors({{2, 2}}, 5);
  const std::string path = ProcessTempDir() + "bad.pth";
  auto expect_refused = [&](std::vector<PthTensor> tensors, DType type, const std::string& what) {
    PthWriteOptions options;
    options.type = type;
    try {
      WritePth(path, tensors, options);
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_FALSE(std::filesystem::exists(path));
    EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  };
  const float* d = src[0].values.data();
  expect_refused({{"a", {2, 2}, d}, {"a", {2, 2}, d}}, DType::kF32, "given twice");
  expect_refused({{"", {2, 2}, d}}, DType::kF32, "empty");
  expect_refused({{"a\nb", {2, 2}, d}}, DType::kF32, "printable");
  expect_refused({{"a", {2, -2}, d}}, DType::kF32, "invalid shape");
  expect_refused({{"a", {2, 2}, nullptr}}, DType::kF32, "no data");
  expect_refused({{"a", {2, 2}, d}}, DType::kF16, "F32 or BF16");
}

// ---- torch.load ----

// torch.load(pth) -> for each tensor in order: "name|dtype|d0,d1,..." on stdout and its values
// as float32 appended to `values`.
struct TorchView {
  std::vector<std::string> lines;
  std::vector<float> values;
};

TorchView TorchLoad(const std::string& pth) {
  const std::string script = ProcessTempDir() + "torch_load.py";
  const std::string values = pth + ".values";
  std::ofstream(script) << R"(import sys, collections, torch
sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
assert isinstance(sd, dict), type(sd)
with open(sys.argv[2], 'wb') as out:
    for name, t in sd.items():
        assert isinstance(t, torch.Tensor) and t.device.type == 'cpu'
        print('%s|%s|%s' % (name, str(t.dtype), ','.join(str(d) for d in t.shape)))
        out.write(t.float().contiguous().numpy().tobytes())
)";
  const auto r =
      testing::RunCommand("/usr/bin/python3 " + script + " " + pth + " " + values + " 2>&1");
  TorchView view;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  size_t start = 0;
  while (start < r.output.size()) {
    const size_t end = r.output.find('\n', start);
    view.lines.push_back(r.output.substr(start, end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  view.values = testing::ReadFloats(values);
  return view;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s;
}

float Bf16Value(float f) {
  const uint32_t u = static_cast<uint32_t>(ExpectedBf16(f)) << 16;
  float g;
  std::memcpy(&g, &u, 4);
  return g;
}

TEST(PthWriter, TorchLoadReadsIt) {
  REQUIRE_TORCH();
  std::vector<std::vector<int64_t>> shapes = kOddShapes;
  for (int i = 0; i < 1100; ++i) shapes.push_back({i % 5 + 1});
  const std::vector<Source> src = RandomTensors(shapes, 6);
  for (DType type : {DType::kF32, DType::kBF16}) {
    for (bool zip64 : {false, true}) {
      SCOPED_TRACE(std::string(DTypeName(type)) + (zip64 ? " zip64" : ""));
      const std::string path = ProcessTempDir() + "torch-" + std::string(DTypeName(type)) +
                               std::to_string(zip64) + ".pth";
      PthWriteOptions options;
      options.type = type;
      options.zip64_always = zip64;
      WritePth(path, Views(src), options);
      const TorchView view = TorchLoad(path);
      ASSERT_EQ(view.lines.size(), src.size());
      size_t at = 0;
      for (size_t i = 0; i < src.size(); ++i) {
        EXPECT_EQ(view.lines[i], src[i].name + "|" +
                                     (type == DType::kF32 ? "torch.float32" : "torch.bfloat16") +
                                     "|" + ShapeText(src[i].shape));
        for (float v : src[i].values) {
          ASSERT_LT(at, view.values.size());
          const float want = type == DType::kF32 ? v : Bf16Value(v);
          ASSERT_EQ(std::memcmp(&view.values[at], &want, 4), 0) << src[i].name;
          ++at;
        }
      }
      EXPECT_EQ(at, view.values.size());
    }
  }
}

// ---- RWKV-7 exports ----

// A random RWKV-7 whose every term matters: matrices ~ 1/sqrt(in), vectors around the values
// trained models hold.
std::vector<float> RandomRwkv7(const train::ParamLayout& layout, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(layout.total_floats(), 0.0f);
  for (const train::ParamEntry& e : layout.entries()) {
    const std::string& n = e.name;
    float mean = 0.0f, scale = 0.3f;
    if (e.shape.size() == 2 && n.find("r_k") == std::string::npos) {
      scale = 1.0f / std::sqrt(static_cast<float>(e.shape[1]));
    }
    if (n.find("ln") != std::string::npos && n.find(".weight") != std::string::npos) mean = 1.0f;
    if (n.find(".x_") != std::string::npos) mean = 0.5f, scale = 0.2f;
    if (n.find("att.w0") != std::string::npos) mean = -2.0f;
    if (n.find("k_k") != std::string::npos) mean = 0.8f, scale = 0.1f;
    if (n.find("k_a") != std::string::npos || n.find("att.v0") != std::string::npos) mean = 1.0f;
    for (size_t i = 0; i < e.size; ++i) p[e.offset + i] = mean + scale * normal(rng);
  }
  return p;
}

const std::vector<int32_t> kPrompt = {10, 200, 3, 77, 77, 255, 0, 42, 128, 9, 31, 64};

TEST(Rwkv7Export, PthHasBlinkDlShapesAndLoads) {
  const auto layout = train::ParamLayout::Rwkv7(train::Rwkv7Config::Official(2, 128, 256));
  const std::vector<float> params = RandomRwkv7(layout, 7);
  const std::string path = ProcessTempDir() + "export.pth";
  train::ExportRwkv7Pth(path, layout, params.data());
  const std::vector<ReadTensor> got = ReadBack(path);
  ASSERT_EQ(got.size(), layout.entries().size());
  for (size_t i = 0; i < got.size(); ++i) {
    const train::ParamEntry& e = layout.entries()[i];
    EXPECT_EQ(got[i].name, e.name);
    EXPECT_EQ(got[i].shape, e.pth_shape) << e.name;
    std::vector<float> v(e.size);
    std::memcpy(v.data(), got[i].bytes.data(), e.size * 4);
    if (e.transposed_in_pth) {  // .pth (cols, rows) of aviary's (rows, cols)
      const int64_t rows = e.shape[0], cols = e.shape[1];
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          ASSERT_EQ(v[c * rows + r], params[e.offset + r * cols + c]) << e.name;
        }
      }
    } else {
      EXPECT_EQ(0, std::memcmp(v.data(), params.data() + e.offset, e.size * 4)) << e.name;
    }
  }
  const std::vector<float> logits = F32Logits(path, kPrompt);
  ASSERT_EQ(logits.size(), kPrompt.size() * 256);
  for (float l : logits) ASSERT_TRUE(std::isfinite(l));
}

TEST(Rwkv7Export, GgufGivesTheSameLogitsAsThePth) {
  for (DType type : {DType::kF32, DType::kBF16}) {
    for (int layers : {1, 3}) {
      SCOPED_TRACE(std::string(DTypeName(type)) + " layers " + std::to_string(layers));
      const auto layout = train::ParamLayout::Rwkv7(train::Rwkv7Config::Official(layers, 128, 256));
      const std::vector<float> params = RandomRwkv7(layout, 8 + layers);
      const std::string stem =
          ProcessTempDir() + "gguf-" + std::string(DTypeName(type)) + std::to_string(layers);
      train::ExportRwkv7Pth(stem + ".pth", layout, params.data(), type);
      train::ExportRwkv7Gguf(stem + ".gguf", stem + ".pth");
      EXPECT_FALSE(std::filesystem::exists(stem + ".gguf.tmp"));
      const std::vector<float> a = F32Logits(stem + ".pth", kPrompt);
      const std::vector<float> b = F32Logits(stem + ".gguf", kPrompt);
      ASSERT_EQ(a.size(), b.size());
      for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "logit " << i;
      // The embedded vocabulary is the byte one.
      const auto model = Model::Load(stem + ".gguf");
      ASSERT_TRUE(model->info().tokenizer_data);
      EXPECT_EQ(model->info().tokenizer_data->kind, "bytes");
    }
  }
}

TEST(Rwkv7Export, GgufOfALargerVocabularyNeedsItsTokenizer) {
  const auto layout = train::ParamLayout::Rwkv7(train::Rwkv7Config::Official(1, 64, 300));
  const std::vector<float> params = RandomRwkv7(layout, 9);
  const std::string stem = ProcessTempDir() + "vocab300";
  train::ExportRwkv7Pth(stem + ".pth", layout, params.data());
  EXPECT_THROW(train::ExportRwkv7Gguf(stem + ".gguf", stem + ".pth"), UsageError);
  EXPECT_FALSE(std::filesystem::exists(stem + ".gguf"));
  EXPECT_THROW(train::ExportRwkv7Gguf(stem + ".pth", stem + ".pth"), UsageError);
}

}  // namespace
}  // namespace aviary
