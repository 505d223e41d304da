// Runs one training forward and backward pass of aviary's RWKV-7 on given weights, tokens and
// start state, and writes everything tests/train/check_gradients.py compares with PyTorch
// autograd: the loss, the logits, the end state, every parameter's gradient (in the .pth's
// shape) and the gradient of the start state. With --chunks K the sequences run as K
// consecutive chunks, the state carried forward and its gradient carried back.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

#include "aviary/error.h"
#include "train/import.h"
#include "train/rwkv7_graph.h"

namespace {

template <typename T>
std::vector<T> ReadRaw(const std::string& path, size_t count) {
  std::ifstream in(path, std::ios::binary);
  std::vector<T> v(count);
  if (!in.read(reinterpret_cast<char*>(v.data()), count * sizeof(T))) {
    throw aviary::Error(path + ": expected " + std::to_string(count * sizeof(T)) + " bytes");
  }
  return v;
}

void WriteRaw(const std::string& path, const float* data, size_t count) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data), count * sizeof(float));
  if (!out) throw aviary::Error(path + ": write failed");
}

int Run(int argc, char** argv) {
  CLI::App app("aviary's RWKV-7 gradients for tests/train/check_gradients.py");
  std::string model, inputs_path, targets_path, state_path, out;
  int B = 1, T = 1, K = 1;
  app.add_option("--model", model)->required();
  app.add_option("--inputs", inputs_path)->required();
  app.add_option("--targets", targets_path)->required();
  app.add_option("--batch", B)->required();
  app.add_option("--ctx", T)->required();
  app.add_option("--chunks", K);
  app.add_option("--state", state_path);
  app.add_option("--out", out)->required();
  CLI11_PARSE(app, argc, argv);
  if (K < 1 || T % K != 0) throw aviary::Error("--ctx must be a multiple of --chunks");

  using namespace aviary::train;
  const ImportedRwkv7 model_params = LoadRwkv7Params(model);
  const ParamLayout& layout = model_params.layout;
  const Rwkv7Config& c = layout.config();
  const std::vector<int32_t> inputs = ReadRaw<int32_t>(inputs_path, size_t(B) * T);
  const std::vector<int32_t> targets = ReadRaw<int32_t>(targets_path, size_t(B) * T);
  const int Tc = T / K;
  std::vector<std::unique_ptr<Rwkv7Graph>> chunks;
  for (int k = 0; k < K; ++k) chunks.push_back(std::make_unique<Rwkv7Graph>(layout, B, Tc));
  const size_t SF = chunks[0]->StateFloats();
  std::vector<float> state(size_t(B) * SF, 0.0f);
  if (!state_path.empty()) state = ReadRaw<float>(state_path, state.size());

  // Chunk k holds tokens [k Tc, (k + 1) Tc) of every sequence.
  auto slice = [&](const std::vector<int32_t>& all, int k) {
    std::vector<int32_t> part;
    for (int b = 0; b < B; ++b) {
      part.insert(part.end(), all.begin() + size_t(b) * T + size_t(k) * Tc,
                  all.begin() + size_t(b) * T + size_t(k + 1) * Tc);
    }
    return part;
  };
  std::vector<float> logits(size_t(B) * T * c.vocab), part_logits(size_t(B) * Tc * c.vocab);
  std::vector<std::vector<float>> states(K + 1);
  states[0] = state;
  double loss = 0;
  for (int k = 0; k < K; ++k) {
    states[k + 1].resize(state.size());
    const LossSum l =
        chunks[k]->Forward(model_params.params.data(), slice(inputs, k), slice(targets, k), B, Tc,
                           states[k].data(), states[k + 1].data(), part_logits.data());
    loss += l.sum;
    for (int b = 0; b < B; ++b) {
      std::copy(part_logits.begin() + size_t(b) * Tc * c.vocab,
                part_logits.begin() + size_t(b + 1) * Tc * c.vocab,
                logits.begin() + (size_t(b) * T + size_t(k) * Tc) * c.vocab);
    }
  }
  std::vector<float> grads(layout.total_floats(), 0.0f);
  std::vector<float> d_state(state.size(), 0.0f), d_prev(state.size());
  for (int k = K - 1; k >= 0; --k) {
    chunks[k]->Backward(model_params.params.data(), grads.data(), 1.0f / (float(B) * T),
                        d_state.data(), d_prev.data());
    d_state = d_prev;
  }

  std::filesystem::create_directories(out);
  std::ofstream(out + "/loss.txt") << std::to_string(loss / (double(B) * T)) << "\n";
  WriteRaw(out + "/logits.f32", logits.data(), logits.size());
  WriteRaw(out + "/state_out.f32", states[K].data(), states[K].size());
  WriteRaw(out + "/state_in.grad.f32", d_state.data(), d_state.size());
  for (const ParamEntry& e : layout.entries()) {
    std::vector<float> g(grads.begin() + e.offset, grads.begin() + e.offset + e.size);
    if (e.transposed_in_pth) {  // [out, in] here, [in, out] in the .pth
      const int64_t rows = e.shape[0], cols = e.shape[1];
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t col = 0; col < cols; ++col)
          g[col * rows + r] = grads[e.offset + r * cols + col];
      }
    }
    WriteRaw(out + "/" + e.name + ".grad.f32", g.data(), g.size());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
