// The data-parallel pieces that run in one process: the gradient buckets (each sent once, as
// soon as its last float is ready, whatever order the ranges come in), the backward pass's
// "gradients ready" ranges (they cover the buffer once, and a range's values are final when it
// is announced), the single-process communicator and the weights' checksum.
// (train_mpi_test runs `aviary train` under mpirun.)
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "aviary/error.h"
#include "train/comm.h"
#include "train/init.h"
#include "train/params.h"
#include "train/rwkv7_graph.h"

namespace aviary::train {
namespace {

using Ranges = std::vector<std::pair<size_t, size_t>>;

TEST(Buckets, CompleteOnceWhenTheirLastFloatIsReady) {
  Buckets b(10, 4);  // [0,4) [4,8) [8,10)
  EXPECT_EQ(b.count(), 3u);
  EXPECT_EQ(b.MarkReady(7, 10), (Ranges{{8, 10}}));
  EXPECT_EQ(b.MarkReady(5, 7), Ranges{});
  EXPECT_EQ(b.MarkReady(0, 3), Ranges{});
  EXPECT_FALSE(b.AllReady());
  EXPECT_EQ(b.MarkReady(3, 5), (Ranges{{0, 4}, {4, 8}}));
  EXPECT_TRUE(b.AllReady());
  b.Reset();
  EXPECT_FALSE(b.AllReady());
  EXPECT_EQ(b.MarkReady(0, 10), (Ranges{{0, 4}, {4, 8}, {8, 10}}));
}

TEST(Buckets, AnyOrderSendsEveryFloatExactlyOnce) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const size_t n = 1 + rng() % 300, size = 1 + rng() % 40;
    // Cut [0, n) at random points and announce the pieces in a random order.
    std::vector<size_t> cuts = {0, n};
    for (int i = 0; i < 6; ++i) cuts.push_back(rng() % n);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    Ranges pieces;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) pieces.emplace_back(cuts[i], cuts[i + 1]);
    std::shuffle(pieces.begin(), pieces.end(), rng);
    Buckets b(n, size);
    std::vector<int> sent(n, 0), ready(n, 0);
    for (const auto& [pb, pe] : pieces) {
      for (size_t i = pb; i < pe; ++i) ready[i] = 1;
      for (const auto& [bb, be] : b.MarkReady(pb, pe)) {
        EXPECT_EQ(bb % size, 0u);
        EXPECT_LE(be - bb, size);
        for (size_t i = bb; i < be; ++i) {
          EXPECT_TRUE(ready[i]) << "float " << i << " sent before it was ready";
          ++sent[i];
        }
      }
    }
    EXPECT_TRUE(b.AllReady());
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(sent[i], 1) << "n " << n << " float " << i;
  }
}

TEST(Buckets, RefusesRangesOutsideOrTwice) {
  Buckets b(10, 4);
  EXPECT_THROW(b.MarkReady(8, 11), Error);
  EXPECT_THROW(b.MarkReady(5, 4), Error);
  b.MarkReady(0, 4);
  EXPECT_THROW(b.MarkReady(0, 4), Error);
}

// The backward pass's ranges: disjoint, covering the whole buffer, and each final when given
// (nothing later in the pass changes it).
TEST(GradsReady, RangesCoverTheBufferOnceAndAreFinal) {
  for (int layers : {1, 3}) {
    const ParamLayout layout = ParamLayout::Rwkv7(Rwkv7Config::Official(layers, 64, 256));
    std::vector<float> params(layout.total_floats());
    InitRwkv7(layout, 1, params.data());
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-0.1f, 0.1f);
    for (float& p : params) p += u(rng);  // zero-initialised tensors would hide a late write
    const int B = 2, T = 24;
    std::vector<int32_t> in(B * T), tg(B * T);
    for (auto& t : in) t = static_cast<int32_t>(rng() % 256);
    for (auto& t : tg) t = static_cast<int32_t>(rng() % 256);
    Rwkv7Graph graph(layout, B, T);
    std::vector<float> grads(layout.total_floats(), 0.0f);
    graph.Forward(params.data(), in, tg, B, T, nullptr, nullptr);
    Ranges ranges;
    std::vector<std::vector<float>> snapshots;
    graph.Backward(params.data(), grads.data(), 1.0f / (B * T), nullptr, nullptr,
                   [&](size_t b, size_t e) {
                     ranges.emplace_back(b, e);
                     snapshots.emplace_back(grads.begin() + b, grads.begin() + e);
                   });
    ASSERT_EQ(ranges.size(), static_cast<size_t>(layers) + 1);
    EXPECT_EQ(ranges.back().first, 0u) << "the embedding and layer 0 come last";
    std::vector<int> covered(grads.size(), 0);
    for (size_t r = 0; r < ranges.size(); ++r) {
      const auto [b, e] = ranges[r];
      for (size_t i = b; i < e; ++i) ++covered[i];
      for (size_t i = b; i < e; ++i) {
        ASSERT_EQ(snapshots[r][i - b], grads[i]) << "float " << i << " changed after its range";
      }
    }
    for (size_t i = 0; i < covered.size(); ++i) ASSERT_EQ(covered[i], 1) << "float " << i;
    // And the gradients are the ones without the callback.
    std::vector<float> plain(layout.total_floats(), 0.0f);
    graph.Forward(params.data(), in, tg, B, T, nullptr, nullptr);
    graph.Backward(params.data(), plain.data(), 1.0f / (B * T), nullptr, nullptr);
    EXPECT_EQ(plain, grads);
  }
}

TEST(SingleProcessComm, IsOneRankAndChangesNothing) {
  auto comm = SingleProcessComm();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  std::vector<float> g = {1.5f, -2.0f, 3.25f};
  comm->AllReduceSum(g.data(), g.size());
  EXPECT_EQ(g, (std::vector<float>{1.5f, -2.0f, 3.25f}));
  double d[2] = {4.0, 5.0};
  comm->AllReduceSum(d, 2);
  EXPECT_EQ(d[0], 4.0);
  EXPECT_EQ(comm->AllGather(42), std::vector<uint64_t>{42});
}

TEST(FloatsChecksum, SeesEveryBit) {
  std::vector<float> a(1001);
  std::iota(a.begin(), a.end(), 0.0f);
  const uint64_t h = FloatsChecksum(a.data(), a.size());
  EXPECT_EQ(h, FloatsChecksum(a.data(), a.size()));
  for (size_t i : {size_t{0}, size_t{500}, size_t{1000}}) {
    std::vector<float> b = a;
    b[i] = std::nextafter(b[i], 1e9f);
    EXPECT_NE(FloatsChecksum(b.data(), b.size()), h) << i;
  }
  EXPECT_NE(FloatsChecksum(a.data(), 1000), h);
}

}  // namespace
}  // namespace aviary::train
