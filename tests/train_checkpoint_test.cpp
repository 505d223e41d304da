// Training checkpoints (src/train/checkpoint.cpp): bit-exact round trips of the three buffers
// and the metadata; every damaged, foreign or mismatched checkpoint refused with one line naming
// the file; a save that fails or is killed (SIGKILL at many points) leaves the previous
// checkpoint loadable; leftovers of killed saves are removed by the next save.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "aviary/error.h"
#include "test_data.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace aviary::train {
namespace {

namespace fs = std::filesystem;
using testing::ProcessTempDir;

struct Buffers {
  std::vector<float> params, m, v;
};

Buffers RandomBuffers(const ParamLayout& layout, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Buffers b;
  for (auto* v : {&b.params, &b.m, &b.v}) {
    v->resize(layout.total_floats());
    for (float& x : *v) x = normal(rng);
  }
  // Values a checkpoint must keep bit for bit: signed zero, a NaN payload, subnormals, infinity.
  const uint32_t specials[] = {0x80000000u, 0x7fc01234u, 0x00000001u, 0x7f800000u};
  std::memcpy(b.params.data(), specials, sizeof specials);
  return b;
}

CheckpointMeta SomeMeta(int64_t step) {
  CheckpointMeta meta;
  meta.step = step;
  meta.rng_state = "123 456\n789 \"quoted\" \\ back";
  meta.sampler_state = "position " + std::to_string(step * 1000);
  meta.options = {{"lr", 3e-4},        {"lr_final", 1e-5}, {"batch", 12},
                  {"data", {"a.txt"}}, {"seed", 42},       {"nested", {{"x", 0.1}}}};
  meta.extra = {{"tokens_seen", step * 768}, {"best_val", 1.2345678901234567}};
  return meta;
}

void Save(const std::string& dir, const ParamLayout& layout, const Buffers& b,
          const CheckpointMeta& meta) {
  SaveCheckpoint(dir, layout, b.params.data(), b.m.data(), b.v.data(), meta);
}

bool SameBits(const std::vector<float>& a, const AlignedVector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void ExpectEqual(const Checkpoint& cp, const Buffers& b, const CheckpointMeta& meta) {
  EXPECT_TRUE(SameBits(b.params, cp.params));
  EXPECT_TRUE(SameBits(b.m, cp.adam_m));
  EXPECT_TRUE(SameBits(b.v, cp.adam_v));
  EXPECT_EQ(cp.meta.step, meta.step);
  EXPECT_EQ(cp.meta.rng_state, meta.rng_state);
  EXPECT_EQ(cp.meta.sampler_state, meta.sampler_state);
  EXPECT_EQ(cp.meta.options, meta.options);
  EXPECT_EQ(cp.meta.extra, meta.extra);
}

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

std::string FreshDir(const std::string& name) {
  const std::string dir = ProcessTempDir() + name;
  fs::remove_all(dir);
  return dir;
}

const ParamLayout& SmallLayout() {
  static const ParamLayout layout = ParamLayout::Rwkv7(Rwkv7Config::Official(2, 64, 256));
  return layout;
}

// Loading fails with one line that starts with `file` and contains `what`.
void ExpectRefused(const std::string& dir, const std::string& file, const std::string& what,
                   const ParamLayout* expected = nullptr) {
  try {
    LoadCheckpoint(dir, expected);
    ADD_FAILURE() << "no error (wanted: " << what << ")";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(file + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(Checkpoint, RoundTripIsBitExact) {
  const std::string dir = FreshDir("roundtrip");
  const ParamLayout& layout = SmallLayout();
  const Buffers b = RandomBuffers(layout, 1);
  const CheckpointMeta meta = SomeMeta(17);
  EXPECT_FALSE(HasCheckpoint(dir));
  Save(dir, layout, b, meta);
  EXPECT_TRUE(HasCheckpoint(dir));
  ExpectEqual(LoadCheckpoint(dir), b, meta);
  const Checkpoint cp = LoadCheckpoint(dir, &layout);
  ExpectEqual(cp, b, meta);
  EXPECT_EQ(cp.layout.total_floats(), layout.total_floats());
  EXPECT_EQ(cp.layout.config().d_gate, layout.config().d_gate);
  EXPECT_EQ(Files(dir), (std::set<std::string>{"meta.json", "params-17.f32", "adam_m-17.f32",
                                               "adam_v-17.f32"}));
}

TEST(Checkpoint, NewSaveReplacesTheOldAndRemovesItsFiles) {
  const std::string dir = FreshDir("replace");
  const ParamLayout& layout = SmallLayout();
  Save(dir, layout, RandomBuffers(layout, 1), SomeMeta(1));
  const Buffers b2 = RandomBuffers(layout, 2);
  Save(dir, layout, b2, SomeMeta(2));
  ExpectEqual(LoadCheckpoint(dir, &layout), b2, SomeMeta(2));
  EXPECT_EQ(Files(dir),
            (std::set<std::string>{"meta.json", "params-2.f32", "adam_m-2.f32", "adam_v-2.f32"}));
  // The same step again takes a new tag instead of writing over the files meta.json names.
  const Buffers b3 = RandomBuffers(layout, 3);
  Save(dir, layout, b3, SomeMeta(2));
  ExpectEqual(LoadCheckpoint(dir, &layout), b3, SomeMeta(2));
  EXPECT_EQ(Files(dir), (std::set<std::string>{"meta.json", "params-2.1.f32", "adam_m-2.1.f32",
                                               "adam_v-2.1.f32"}));
}

TEST(Checkpoint, LeftoversOfAKilledSaveAreIgnoredThenRemoved) {
  const std::string dir = FreshDir("leftovers");
  const ParamLayout& layout = SmallLayout();
  const Buffers b = RandomBuffers(layout, 4);
  Save(dir, layout, b, SomeMeta(5));
  WriteText(dir + "/params-6.f32", "half a file");
  WriteText(dir + "/meta.json.tmp", "{\"format\": \"aviary-tr");
  WriteText(dir + "/notes.txt", "the user's own file");
  ExpectEqual(LoadCheckpoint(dir, &layout), b, SomeMeta(5));
  Save(dir, layout, b, SomeMeta(6));  // 6 is taken by the leftover: the tag becomes 6.1
  ExpectEqual(LoadCheckpoint(dir, &layout), b, SomeMeta(6));
  EXPECT_EQ(Files(dir), (std::set<std::string>{"meta.json", "params-6.1.f32", "adam_m-6.1.f32",
                                               "adam_v-6.1.f32", "notes.txt"}));
}

TEST(Checkpoint, AFailedSaveKeepsThePreviousCheckpoint) {
  const std::string dir = FreshDir("failed");
  const ParamLayout& layout = SmallLayout();
  const Buffers b = RandomBuffers(layout, 5);
  Save(dir, layout, b, SomeMeta(1));
  // The index's temporary cannot be written (a folder is in its way): the data files are
  // written first, then the save fails before meta.json changes.
  fs::create_directory(dir + "/meta.json.tmp");
  EXPECT_THROW(Save(dir, layout, RandomBuffers(layout, 6), SomeMeta(2)), Error);
  ExpectEqual(LoadCheckpoint(dir, &layout), b, SomeMeta(1));
  EXPECT_FALSE(fs::exists(dir + "/params-2.f32"));  // the failed save removed its files
  fs::remove(dir + "/meta.json.tmp");
  // Opaque states that are not text are refused before anything changes.
  CheckpointMeta binary = SomeMeta(3);
  binary.rng_state = std::string("\xff\xfe\x00", 3);
  EXPECT_THROW(Save(dir, layout, b, binary), UsageError);
  ExpectEqual(LoadCheckpoint(dir, &layout), b, SomeMeta(1));
}

// A child process saves while the parent kills it with SIGKILL after a growing delay (spread over
// the time a save takes here); after each kill the folder must load, bit for bit, as either the
// last complete checkpoint or the new one.
TEST(Checkpoint, AKilledSaveLeavesTheLastGoodCheckpoint) {
  const std::string dir = FreshDir("killed");
  // About 4.5 M floats per buffer: 54 MB a save, long enough to be killed in the middle.
  const ParamLayout layout = ParamLayout::Rwkv7(Rwkv7Config::Official(4, 256, 2048));
  std::vector<Buffers> versions;
  for (uint32_t s = 0; s < 3; ++s) versions.push_back(RandomBuffers(layout, 100 + s));
  Save(dir, layout, versions[0], SomeMeta(0));
  int last_good = 0, interrupted = 0, completed = 0;
  std::chrono::steady_clock::duration save_time{};
  // Attempt 1 runs to the end and times a save in a child; the others are killed from the start
  // of the save to twice that time.
  for (int attempt = 1; attempt <= 17; ++attempt) {
    const int next = attempt % 3;
    const auto start = std::chrono::steady_clock::now();
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        Save(dir, layout, versions[next], SomeMeta(attempt));
      } catch (...) {
        _exit(3);
      }
      _exit(0);
    }
    if (attempt > 1) {
      std::this_thread::sleep_for(save_time * (attempt - 1) / 8);
      kill(child, SIGKILL);
    }
    int status = 0;
    waitpid(child, &status, 0);
    if (attempt == 1) save_time = std::chrono::steady_clock::now() - start;
    ASSERT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << "the save failed";
    const Checkpoint cp = LoadCheckpoint(dir, &layout);
    if (cp.meta.step == attempt) {
      ExpectEqual(cp, versions[next], SomeMeta(attempt));
      last_good = attempt;
      ++completed;
    } else {
      ASSERT_EQ(cp.meta.step, last_good);
      ExpectEqual(cp, versions[last_good % 3], SomeMeta(last_good));
      ++interrupted;
    }
  }
  std::printf("killed saves: %d interrupted, %d completed (a save takes %.0f ms)\n", interrupted,
              completed, std::chrono::duration<double, std::milli>(save_time).count());
  // A save after all that works and tidies the folder.
  Save(dir, layout, versions[1], SomeMeta(99));
  ExpectEqual(LoadCheckpoint(dir, &layout), versions[1], SomeMeta(99));
  EXPECT_EQ(Files(dir).size(), 4u);
}

TEST(Checkpoint, DamagedDataFilesAreRefused) {
  const ParamLayout& layout = SmallLayout();
  const Buffers b = RandomBuffers(layout, 7);
  const std::string dir = FreshDir("damaged");
  Save(dir, layout, b, SomeMeta(3));
  const std::string params = dir + "/params-3.f32";
  const uintmax_t size = fs::file_size(params);

  fs::resize_file(params, size - 4);
  ExpectRefused(dir, params, "truncated");
  fs::resize_file(params, size + 4);
  ExpectRefused(dir, params, "truncated or replaced");
  fs::resize_file(params, size);  // zeros at the end now: the CRC catches it
  ExpectRefused(dir, params, "CRC-32");
  fs::remove(params);
  ExpectRefused(dir, params, "missing");
}

TEST(Checkpoint, ForeignOrBrokenIndexesAreRefused) {
  const ParamLayout& layout = SmallLayout();
  const std::string dir = FreshDir("foreign");
  Save(dir, layout, RandomBuffers(layout, 8), SomeMeta(4));
  const std::string index = dir + "/meta.json";
  const std::string good = ReadText(index);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    const size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) text.replace(at, from.size(), to);
    WriteText(index, text);
  };

  WriteText(index, good.substr(0, good.size() / 2));
  ExpectRefused(dir, index, "not valid JSON");
  WriteText(index, "[1, 2, 3]");
  ExpectRefused(dir, index, "not a JSON object");
  WriteText(index, "{}");
  ExpectRefused(dir, index, "no \"format\"");
  WriteText(index, std::string(100, '[') + std::string(100, ']'));
  ExpectRefused(dir, index, "nested too deeply");
  with("aviary-train-checkpoint", "some-other-tool");
  ExpectRefused(dir, index, "not an aviary training checkpoint");
  with("\"version\": 1", "\"version\": 2");
  ExpectRefused(dir, index, "version 2");
  with("\"step\": 4", "\"step\": -4");
  ExpectRefused(dir, index, "\"step\"");
  with("\"n_layer\": 2", "\"n_layer\": 3");
  ExpectRefused(dir, index, "total_floats");
  with("\"n_embd\": 64", "\"n_embd\": 0");
  ExpectRefused(dir, index, "width must be");
  with("\"layout_hash\": \"", "\"layout_hash\": \"0");
  ExpectRefused(dir, index, "layout_hash");
  with("\"name\": \"params-4.f32\"", "\"name\": \"../params-4.f32\"");
  ExpectRefused(dir, index, "files.params.name");
  with("\"name\": \"adam_m-4.f32\"", "\"name\": \"params-4.f32\"");
  ExpectRefused(dir, index, "used twice");
  with("\"options\": {", "\"options\": [], \"x\": {");
  ExpectRefused(dir, index, "\"options\" is not an object");
  fs::remove(index);
  ExpectRefused(dir, index, "no checkpoint here");
  EXPECT_FALSE(HasCheckpoint(dir));
}

TEST(Checkpoint, AnotherModelsCheckpointIsRefused) {
  const std::string dir = FreshDir("mismatch");
  Save(dir, SmallLayout(), RandomBuffers(SmallLayout(), 9), SomeMeta(1));
  const ParamLayout deeper = ParamLayout::Rwkv7(Rwkv7Config::Official(3, 64, 256));
  ExpectRefused(dir, dir + "/meta.json", "n_layer 2, this run's 3", &deeper);
  const ParamLayout wider_vocab = ParamLayout::Rwkv7(Rwkv7Config::Official(2, 64, 300));
  ExpectRefused(dir, dir + "/meta.json", "vocab 256, this run's 300", &wider_vocab);
}

TEST(Checkpoint, LoadKeepsTheCallersFrozenTensors) {
  const std::string dir = FreshDir("frozen");
  Save(dir, SmallLayout(), RandomBuffers(SmallLayout(), 10), SomeMeta(1));
  ParamLayout frozen = SmallLayout();
  frozen.entries()[0].trainable = false;
  EXPECT_FALSE(LoadCheckpoint(dir, &frozen).layout.entries()[0].trainable);
  EXPECT_TRUE(LoadCheckpoint(dir).layout.entries()[0].trainable);
}

TEST(Checkpoint, CheckSameRunNamesTheOptionThatDiffers) {
  const nlohmann::json a = {{"lr", 3e-4}, {"batch", 12}, {"data", {"a.txt"}}};
  EXPECT_NO_THROW(CheckSameRun(a, a, "DIR"));
  nlohmann::json b = a;
  b["batch"] = 16;
  try {
    CheckSameRun(a, b, "DIR");
    ADD_FAILURE() << "no error";
  } catch (const UsageError& e) {
    EXPECT_EQ(std::string(e.what()),
              "DIR: holds another run's checkpoint (batch: 12 there, 16 in this run)");
  }
  nlohmann::json c = a;
  c.erase("data");
  EXPECT_THROW(CheckSameRun(a, c, "DIR"), UsageError);
  c = a;
  c["extra"] = true;
  EXPECT_THROW(CheckSameRun(a, c, "DIR"), UsageError);
  // Options survive the index exactly, doubles included.
  const std::string dir = FreshDir("options");
  CheckpointMeta meta = SomeMeta(1);
  meta.options = {{"lr", 0.1 + 0.2}, {"wd", 1e-300}, {"name", "ünïcode"}};
  Save(dir, SmallLayout(), RandomBuffers(SmallLayout(), 11), meta);
  EXPECT_NO_THROW(CheckSameRun(LoadCheckpoint(dir).meta.options, meta.options, dir));
}

// A resume reads the run's options back from the index: a count that is a float, negative or
// beyond int is refused naming the field (a cast would be undefined), not used.
TEST(Checkpoint, RecordedOptionsMustBeCountsInRange) {
  const nlohmann::json good = {
      {"data", {"a.txt"}}, {"tokenizer", "world"}, {"init", ""},     {"layers", 2},
      {"embd", 32},        {"ctx_len", 64},        {"batch", 4},     {"steps", 10},
      {"lr", 1e-3},        {"lr_final", 1e-4},     {"warmup", 2},    {"weight_decay", 0.0},
      {"grad_clip", 1.0},  {"seed", 7},            {"val_fraction", 0.1},
      {"eval_every", 5},   {"eval_windows", 8},    {"save_every", 5}, {"pth_type", "f32"}};
  const TrainOptions o = OptionsFromJson(good, "RUN");
  EXPECT_EQ(o.layers, 2);
  EXPECT_EQ(o.chunk_len, 0);  // absent: a run from before chunked windows
  EXPECT_EQ(o.seed, 7u);
  EXPECT_EQ(o.tune, "full");
  for (const auto& [key, value] :
       std::vector<std::pair<std::string, nlohmann::json>>{{"layers", 1.21111e84},
                                                           {"ctx_len", 64.5},
                                                           {"batch", -1},
                                                           {"embd", int64_t{1} << 40},
                                                           {"steps", "10"},
                                                           {"chunk_len", 1e300},
                                                           {"seed", -3}}) {
    nlohmann::json bad = good;
    bad[key] = value;
    try {
      OptionsFromJson(bad, "RUN");
      ADD_FAILURE() << key << " = " << value.dump() << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("RUN: the checkpoint's options", 0), 0u) << e.what();
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  }
  nlohmann::json missing = good;
  missing.erase("batch");
  EXPECT_THROW(OptionsFromJson(missing, "RUN"), Error);
}

}  // namespace
}  // namespace aviary::train
