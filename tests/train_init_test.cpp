// RWKV-7 initialisation (src/train/init.h) against RWKV-LM's formulas, transcribed in
// tests/train/official_init.py and run by Debian's PyTorch: every value that is not random must
// be the same float (within an ulp or two of pow); every random matrix must have the kind and
// gain model.py gives it and the statistics that kind promises.
#include "train/init.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "test_data.h"
#include "train/params.h"

namespace aviary::train {
namespace {

using aviary::testing::InCI;
using aviary::testing::kTorchPython;
using aviary::testing::ProcessTempDir;
using aviary::testing::ReadFloats;
using aviary::testing::RunCommand;

std::string Script() { return std::string(AVIARY_SOURCE_DIR) + "/tests/train/official_init.py"; }

// The .pth-shaped (rows x cols) matrix of an entry from aviary's layout.
std::vector<double> PthMatrix(const ParamEntry& e, const float* params, int64_t& rows,
                              int64_t& cols) {
  rows = e.pth_shape[0];
  cols = e.pth_shape[1];
  std::vector<double> w(e.size);
  const float* p = params + e.offset;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      w[i * cols + j] = e.transposed_in_pth ? p[j * rows + i] : p[i * cols + j];
    }
  }
  return w;
}

// Worst |W W^T - gain^2 I| (rows <= cols) or |W^T W - gain^2 I| (rows > cols), relative to
// gain^2.
double OrthogonalityError(const std::vector<double>& w, int64_t rows, int64_t cols, double gain) {
  const bool by_rows = rows <= cols;
  const int64_t n = by_rows ? rows : cols, len = by_rows ? cols : rows;
  auto at = [&](int64_t vec, int64_t k) { return by_rows ? w[vec * cols + k] : w[k * cols + vec]; };
  double worst = 0;
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = a; b < n; ++b) {
      double s = 0;
      for (int64_t k = 0; k < len; ++k) s += at(a, k) * at(b, k);
      worst = std::max(worst, std::fabs(s - (a == b ? gain * gain : 0.0)) / (gain * gain));
    }
  }
  return worst;
}

void CompareWithOfficial(const Rwkv7Config& config) {
  const ParamLayout layout = ParamLayout::Rwkv7(config);
  std::vector<float> params(layout.total_floats(), 1234.5f);
  InitRwkv7(layout, 42, params.data());

  const std::string dir = ProcessTempDir() + "init-" + std::to_string(config.n_embd);
  const std::string command =
      std::string(kTorchPython) + " " + Script() + " model " + std::to_string(config.n_layer) +
      " " + std::to_string(config.n_embd) + " " + std::to_string(config.head_size) + " " +
      std::to_string(config.vocab) + " " + std::to_string(config.n_ffn) + " " + dir + " 2>&1";
  const auto result = RunCommand(command);
  ASSERT_EQ(result.exit_code, 0) << command << "\n" << result.output;

  std::ifstream manifest(dir + "/manifest.txt");
  std::string line;
  size_t seen = 0;
  while (std::getline(manifest, line)) {
    std::istringstream fields(line);
    std::string name, kind;
    fields >> name >> kind;
    SCOPED_TRACE(name);
    const ParamEntry* e = layout.Find(name);
    ASSERT_NE(e, nullptr) << "aviary's layout lacks " << name;
    ++seen;
    const float* p = params.data() + e->offset;
    if (kind == "tensor") {
      const std::vector<float> expected = ReadFloats(dir + "/" + name + ".f32");
      ASSERT_EQ(expected.size(), e->size);
      int64_t rows = 1, cols = static_cast<int64_t>(e->size);
      const std::vector<double> got = e->pth_shape.size() == 2
                                          ? PthMatrix(*e, params.data(), rows, cols)
                                          : std::vector<double>(p, p + e->size);
      for (size_t i = 0; i < e->size; ++i) {
        // pow in float (torch, Sleef) and in double rounded to float (here) may differ by an ulp.
        ASSERT_NEAR(got[i], expected[i], 2.5e-7 * std::max(1.0f, std::fabs(expected[i])))
            << "index " << i;
      }
    } else if (kind == "orthogonal") {
      double gain = 0;
      fields >> gain;
      int64_t rows = 0, cols = 0;
      const std::vector<double> w = PthMatrix(*e, params.data(), rows, cols);
      EXPECT_LT(OrthogonalityError(w, rows, cols, gain), 2e-6) << "gain " << gain;
    } else if (kind == "uniform") {
      double a = 0, b = 0;
      fields >> a >> b;
      double lo = 1e30, hi = -1e30, sum = 0;
      for (size_t i = 0; i < e->size; ++i) {
        ASSERT_GE(p[i], static_cast<float>(a));
        ASSERT_LE(p[i], static_cast<float>(b));
        lo = std::min<double>(lo, p[i]);
        hi = std::max<double>(hi, p[i]);
        sum += p[i];
      }
      const double width = b - a, n = static_cast<double>(e->size);
      // The extremes of n uniform draws lie within a few widths/n of the ends; the mean within
      // 5 standard deviations (width / sqrt(12 n)) of the middle.
      EXPECT_LT(lo - a, 20 * width / n);
      EXPECT_LT(b - hi, 20 * width / n);
      EXPECT_NEAR(sum / n, (a + b) / 2, 5 * width / std::sqrt(12 * n));
    } else {
      FAIL() << "unknown kind " << kind;
    }
  }
  EXPECT_EQ(seen, layout.entries().size()) << "the .pth and aviary's layout differ";
}

TEST(TrainInit, MatchesRwkvLmFormulas) {
  REQUIRE_TORCH();
  Rwkv7Config config = Rwkv7Config::Official(3, 64, 97);
  config.head_size = 16;  // four heads: the zigzag repeats per head
  CompareWithOfficial(config);
}

TEST(TrainInit, MatchesRwkvLmFormulasNarrowerThanLowRank) {
  REQUIRE_TORCH();
  // C = 16 < the low-rank width 32: ortho_init's extra gain sqrt(D / C); V < C: head gain 0.5.
  Rwkv7Config config = Rwkv7Config::Official(2, 16, 11);
  config.head_size = 8;
  CompareWithOfficial(config);
}

TEST(TrainInit, OrthogonalIsTorchsQrWithSignFix) {
  REQUIRE_TORCH();
  // Tall, wide and square; 150 x 70 and 70 x 150 span three blocks of reflections, 1100 x 100
  // four (the last narrower than the others), several row chunks of the block products (the
  // last one partial) and trailing columns enough to spread over threads.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{40, 24}, {24, 40}, {32, 32}, {150, 70},
                            {70, 150}, {1100, 100}}) {
    SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols));
    InitRng rng(7, static_cast<uint64_t>(rows));
    std::vector<double> gaussian(rows * cols);
    for (double& g : gaussian) g = rng.Normal();
    const std::string in = ProcessTempDir() + "gaussian.f64", out = ProcessTempDir() + "q.f32";
    std::FILE* f = std::fopen(in.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fwrite(gaussian.data(), sizeof(double), gaussian.size(), f);
    std::fclose(f);
    const std::string command = std::string(kTorchPython) + " " + Script() + " orthogonal " +
                                std::to_string(rows) + " " + std::to_string(cols) + " 0.5 " + in +
                                " " + out + " 2>&1";
    const auto result = RunCommand(command);
    ASSERT_EQ(result.exit_code, 0) << command << "\n" << result.output;
    const std::vector<float> expected = ReadFloats(out);
    const std::vector<float> got = OrthogonalFrom(rows, cols, 0.5, gaussian);
    ASSERT_EQ(expected.size(), got.size());
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], expected[i], 1e-6) << i;
  }
}

TEST(TrainInit, DeterministicFromSeedWhateverTheThreads) {
  aviary::testing::RuntimeGuard guard;
  const ParamLayout layout = ParamLayout::Rwkv7(Rwkv7Config::Official(2, 128, 300));
  std::vector<float> one(layout.total_floats()), two(layout.total_floats(), 7.0f),
      other(layout.total_floats());
  aviary::testing::SetNumThreads(1);
  InitRwkv7(layout, 1, one.data());
  aviary::testing::SetNumThreads(2);
  InitRwkv7(layout, 1, two.data());
  InitRwkv7(layout, 2, other.data());
  EXPECT_EQ(0, std::memcmp(one.data(), two.data(), one.size() * sizeof(float)));
  const ParamEntry& head = layout.Get("head.weight");
  EXPECT_NE(one[head.offset], other[head.offset]);
  // The padding between tensors is zero.
  size_t end = 0;
  for (const ParamEntry& e : layout.entries()) {
    for (size_t i = end; i < e.offset; ++i) ASSERT_EQ(two[i], 0.0f) << "padding before " << e.name;
    end = e.offset + e.size;
  }
}

TEST(TrainInit, NormalGeneratorHasUnitMoments) {
  InitRng rng(123, 0);
  const int n = 200000;
  double sum = 0, sum2 = 0;
  for (int i = 0; i < n; ++i) {
    const double x = rng.Normal();
    sum += x;
    sum2 += x * x;
  }
  EXPECT_NEAR(sum / n, 0.0, 5 / std::sqrt(double{n}));
  EXPECT_NEAR(sum2 / n, 1.0, 5 * std::sqrt(2.0 / n));
}

}  // namespace
}  // namespace aviary::train
