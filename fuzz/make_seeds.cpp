// Writes seed corpora for the fuzz targets (scripts/fuzz.sh runs it):
//   make_seeds SHARED_MODELS_DIR MODEL_SEED_DIR STATE_MODEL STATE_SEED_DIR
//   make_seeds --gguf MODEL_SEED_DIR GGUF_SEED_DIR   (each .bin seed written again as GGUF, and
//                                                     a 256-wide Q4_K one)
//   make_seeds --train-data SEED_DIR                 (fuzz_train_data: .idx files as the
//                                                     binidx writer makes them, JSONL files)
//   make_seeds --checkpoint SEED_DIR   (the index of a small training checkpoint, one and two
//                                       layers: whatever the layout code writes today)
// Model seeds: every stress model (../shared/models/stress) shrunk to a few KB -- width 16,
// 2 heads of 8, FFN 32, vocabulary 16, 2 layers -- keeping its tensor names, types and the first
// values of each tensor, plus a quantized variant of each (width 32, matrices in Q4_0..Q8_0
// with made-up blocks). Small valid inputs let the fuzzer reach the model code quickly.
// State seeds: a fresh and a used state of STATE_MODEL, saved with State::Save.
// Reads SHARED_MODELS_DIR, writes only into the two seed folders.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/state.h"
#include "formats/gguf_writer.h"
#include "formats/weight_file.h"
#include "models/synth.h"
#include "train/binidx.h"
#include "train/checkpoint.h"

namespace {

using Bytes = std::vector<uint8_t>;

Bytes ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

bool WriteFile(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

int32_t GetI32(const Bytes& b, size_t at) {
  int32_t v;
  std::memcpy(&v, b.data() + at, 4);
  return v;
}
void PutI32(Bytes& b, int32_t v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  b.insert(b.end(), p, p + 4);
}

struct BlockType {
  int32_t code;
  int bytes;     // per block of 32
  bool has_min;  // Q4_1 / Q5_1 carry a second fp16 (the minimum) after the scale
};
constexpr BlockType kQuantized[] = {
    {2, 18, false}, {3, 20, true}, {7, 22, false}, {8, 24, true}, {9, 34, false}};

size_t ElementBytes(int32_t type) { return type == 0 ? 4 : type == 1 ? 2 : 0; }

// Rewrites an FP32/FP16 rwkv.cpp file with every dimension mapped through `dims` and only
// layers 0 and 1; when `quantize` is set, 2-D matrices whose rows are a multiple of 32 become
// quantized (with deterministic made-up blocks).
bool Shrink(const Bytes& in, const std::map<int32_t, int32_t>& dims, bool quantize, Bytes* out) {
  auto map_dim = [&](int32_t d) {
    auto it = dims.find(d);
    return it == dims.end() ? d : it->second;
  };
  out->clear();
  if (in.size() < 24) return false;
  PutI32(*out, GetI32(in, 0));
  PutI32(*out, 101);
  PutI32(*out, map_dim(GetI32(in, 8)));
  PutI32(*out, map_dim(GetI32(in, 12)));
  PutI32(*out, 2);
  PutI32(*out, quantize ? 2 : GetI32(in, 20));
  uint32_t rng = 12345;
  int rotation = 0;
  size_t p = 24;
  while (p + 12 <= in.size()) {
    const int32_t n_dims = GetI32(in, p), name_len = GetI32(in, p + 4), type = GetI32(in, p + 8);
    p += 12;
    if (n_dims < 1 || n_dims > 4 || name_len < 1 || ElementBytes(type) == 0) return false;
    std::vector<int32_t> shape;
    uint64_t numel = 1, new_numel = 1;
    for (int i = 0; i < n_dims; ++i, p += 4) {
      const int32_t d = GetI32(in, p);
      numel *= static_cast<uint64_t>(d);
      shape.push_back(map_dim(d));
      new_numel *= static_cast<uint64_t>(shape.back());
    }
    const std::string name(reinterpret_cast<const char*>(in.data() + p), name_len);
    p += name_len;
    const size_t data_at = p;
    p += numel * ElementBytes(type);
    if (p > in.size()) return false;
    if (name.rfind("blocks.", 0) == 0 && name.rfind("blocks.0.", 0) != 0 &&
        name.rfind("blocks.1.", 0) != 0) {
      continue;
    }
    const bool matrix = n_dims == 2 && shape[0] % 32 == 0 && name != "emb.weight" &&
                        name != "head.weight" && name.find(".weight") != std::string::npos;
    const BlockType* q = quantize && matrix ? &kQuantized[rotation++ % 5] : nullptr;
    PutI32(*out, n_dims);
    PutI32(*out, name_len);
    PutI32(*out, q ? q->code : type);
    for (int32_t d : shape) PutI32(*out, d);
    out->insert(out->end(), name.begin(), name.end());
    if (q) {
      for (uint64_t b = 0; b < new_numel / 32; ++b) {
        Bytes block(q->bytes);
        for (auto& byte : block)
          byte = static_cast<uint8_t>((rng = rng * 1103515245 + 12345) >> 16);
        block[0] = 0x00;  // scale: fp16 0x2000 (about 0.0078)
        block[1] = 0x20;
        if (q->has_min) block[2] = block[3] = 0;
        out->insert(out->end(), block.begin(), block.end());
      }
    } else {
      const size_t n = new_numel * ElementBytes(type);
      if (n > numel * ElementBytes(type)) return false;
      out->insert(out->end(), in.begin() + data_at, in.begin() + data_at + n);
    }
  }
  return p == in.size();
}

// True when the bytes load and run.
bool Works(const Bytes& bytes, const std::string& name) {
  try {
    auto model = aviary::Model::LoadFromMemory(bytes, name);
    aviary::State state = model->NewState();
    std::vector<float> logits;
    const int32_t tokens[2] = {1, 2};
    model->Eval(tokens, state, &logits);
    return true;
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "make_seeds: %s\n", e.what());
    return false;
  }
}

// Every working .bin seed in `bin_dir`, written as GGUF into `gguf_dir`.
int MakeGgufSeeds(const std::string& bin_dir, const std::string& gguf_dir) {
  int written = 0;
  for (const auto& entry : std::filesystem::directory_iterator(bin_dir)) {
    // Only whole models: the truncated seeds (cut-*) are refused by design.
    if (entry.path().extension() != ".bin" ||
        entry.path().filename().string().rfind("cut-", 0) == 0) {
      continue;
    }
    const Bytes bytes = ReadFile(entry.path());
    const std::string out = gguf_dir + "/" + entry.path().stem().string() + ".gguf";
    try {
      const aviary::WeightFile wf = aviary::ReadWeightFile(bytes, entry.path());
      auto model = aviary::Model::LoadFromMemory(bytes, entry.path());
      aviary::WriteGguf(wf, model->info(), {}, out);
      ++written;
    } catch (const aviary::Error& e) {
      std::fprintf(stderr, "make_seeds: %s\n", e.what());
    }
  }
  // The seeds above are 16-32 wide, too narrow for K-quants (rows of 256): one RWKV-7 layer of
  // width 256 in Q4_K reaches their decoders.
  try {
    aviary::SynthOptions o;
    o.n_layer = 1;
    o.n_embd = 256;
    o.n_vocab = 16;
    o.n_ffn = 256;
    const std::string bin = gguf_dir + "/k-seed.tmp";
    aviary::WriteSynthModel(o, bin);
    const Bytes bytes = ReadFile(bin);
    std::filesystem::remove(bin);
    const aviary::WeightFile wf = aviary::ReadWeightFile(bytes, bin);
    auto model = aviary::Model::LoadFromMemory(bytes, bin);
    aviary::GgufWriteOptions options;
    options.type = aviary::DType::kQ4_K;
    aviary::WriteGguf(wf, model->info(), options, gguf_dir + "/seed-7-Q4_K.gguf");
    ++written;
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "make_seeds: %s\n", e.what());
  }
  std::printf("make_seeds: wrote %d GGUF seeds\n", written);
  return written > 0 ? 0 : 1;
}

// fuzz_train_data's inputs: a first byte choosing the reader (even: .idx, odd: JSONL), then for
// an index the size of its .bin (uint64) and the .idx itself.
int MakeTrainDataSeeds(const std::string& dir) {
  int written = 0;
  auto write_index = [&](const std::string& name, aviary::train::TokenType type,
                         const std::vector<std::vector<int32_t>>& docs) {
    const std::string prefix = dir + "/" + name + ".tmp";
    try {
      aviary::train::BinidxWriter writer(prefix, type);
      for (const auto& doc : docs) {
        writer.Add(doc);
        writer.EndDocument();
      }
      writer.Finish();
    } catch (const aviary::Error& e) {
      std::fprintf(stderr, "make_seeds: %s\n", e.what());
      return;
    }
    const Bytes idx = ReadFile(prefix + ".idx");
    const uint64_t bin_bytes = std::filesystem::file_size(prefix + ".bin");
    std::filesystem::remove(prefix + ".idx");
    std::filesystem::remove(prefix + ".bin");
    Bytes seed = {0};
    seed.resize(9);
    std::memcpy(&seed[1], &bin_bytes, 8);
    seed.insert(seed.end(), idx.begin(), idx.end());
    if (WriteFile(dir + "/" + name, seed)) ++written;
  };
  // make_data.py's layout (each document ended by token 0), and Megatron's int32.
  write_index("idx-uint16", aviary::train::TokenType::kUInt16,
              {{33, 44, 65529, 0}, {0}, {7, 8, 9, 0}});
  write_index("idx-int32", aviary::train::TokenType::kInt32, {{1, 100000, 0}, {5, 0}});
  write_index("idx-one-item", aviary::train::TokenType::kUInt16, {{1, 2, 3}});
  const char* jsonl[] = {
      "{\"text\": \"Hello world.\\nSecond line.\"}\n{\"text\": \"Zweites\"}\n",
      "{\"meta\": {\"id\": 3}, \"text\": \"a\\u00e9\\ud83d\\ude00\"}\r\n\n  \n{\"text\": \"\"}",
      "{\"text\": \"ok\"}\n{\"text\": 5}\n",
      "{\"text\": \"ok\"}\n{\"text\" \"x\"}\n",
      "[\"text\"]\n",
  };
  int n = 0;
  for (const char* text : jsonl) {
    Bytes seed = {1};
    seed.insert(seed.end(), text, text + std::strlen(text));
    if (WriteFile(dir + "/jsonl-" + std::to_string(n++), seed)) ++written;
  }
  std::printf("make_seeds: wrote %d training data seeds\n", written);
  return written > 0 ? 0 : 1;
}

int MakeCheckpointSeeds(const std::string& seed_dir) {
  namespace fs = std::filesystem;
  int written = 0;
  for (int layers : {1, 2}) {
    try {
      const auto layout =
          aviary::train::ParamLayout::Rwkv7(aviary::train::Rwkv7Config::Official(layers, 64, 256));
      const std::vector<float> zeros(layout.total_floats(), 0.0f);
      aviary::train::CheckpointMeta meta;
      meta.step = 12;
      meta.rng_state = "5489 1 2 3";
      meta.sampler_state = "{\"position\": 768}";
      meta.options = {{"lr", 6e-4}, {"batch", 12}, {"data", {"input.txt"}}};
      meta.extra = {{"tokens_seen", 9216}};
      const std::string dir = seed_dir + "/checkpoint.tmp";
      aviary::train::SaveCheckpoint(dir, layout, zeros.data(), zeros.data(), zeros.data(), meta);
      fs::copy_file(dir + "/meta.json", seed_dir + "/meta-" + std::to_string(layers) + ".json",
                    fs::copy_options::overwrite_existing);
      fs::remove_all(dir);
      ++written;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "make_seeds: %s\n", e.what());
    }
  }
  std::printf("make_seeds: wrote %d checkpoint index seeds\n", written);
  return written > 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--gguf") return MakeGgufSeeds(argv[2], argv[3]);
  if (argc == 3 && std::string(argv[1]) == "--train-data") return MakeTrainDataSeeds(argv[2]);
  if (argc == 3 && std::string(argv[1]) == "--checkpoint") return MakeCheckpointSeeds(argv[2]);
  if (argc != 5) {
    std::fprintf(stderr,
                 "usage: make_seeds SHARED_MODELS_DIR MODEL_SEED_DIR STATE_MODEL STATE_SEED_DIR\n");
    return 2;
  }
  const std::string shared = argv[1], model_dir = argv[2], state_model = argv[3],
                    state_dir = argv[4];
  int written = 0, failed = 0;
  // Stress models: width 128, 2 heads of 64, FFN 448, vocabulary 256, v6 mix rank 32 (x5).
  const std::map<int32_t, int32_t> small = {{128, 16}, {64, 8},   {32, 8},
                                            {160, 40}, {448, 32}, {256, 16}};
  const std::map<int32_t, int32_t> small_q = {{128, 32}, {64, 16},  {32, 16},
                                              {160, 80}, {448, 64}, {256, 32}};
  for (const char* version : {"4v0", "5v1", "5v2", "6v0", "7v0"}) {
    for (const char* type : {"FP32", "FP16"}) {
      const std::string stem = std::string("stress-rwkv-") + version + "-" + type;
      const Bytes in = ReadFile(shared + "/stress/" + stem + ".bin");
      if (in.empty()) {
        std::fprintf(stderr, "make_seeds: missing %s/stress/%s.bin\n", shared.c_str(),
                     stem.c_str());
        ++failed;
        continue;
      }
      for (bool quantize : {false, true}) {
        if (quantize && std::string(type) == "FP32") continue;
        Bytes out;
        const std::string name =
            model_dir + "/seed-" + version + "-" + (quantize ? "Q" : type) + ".bin";
        if (Shrink(in, quantize ? small_q : small, quantize, &out) && Works(out, name) &&
            WriteFile(name, out)) {
          ++written;
        } else {
          std::fprintf(stderr, "make_seeds: could not make %s\n", name.c_str());
          ++failed;
        }
      }
    }
  }
  try {
    auto model = aviary::Model::Load(state_model);
    aviary::State state = model->NewState();
    state.Save(state_dir + "/seed-fresh.state");
    const int32_t tokens[3] = {0x22, 0x69, 0x6e};
    model->Eval(tokens, state, nullptr);
    state.Save(state_dir + "/seed-used.state");
    written += 2;
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "make_seeds: state seeds: %s\n", e.what());
    ++failed;
  }
  std::printf("make_seeds: wrote %d seeds (%d failed)\n", written, failed);
  return failed ? 1 : 0;
}
