// Training checkpoints (see checkpoint.h): raw float32 files indexed by a JSON file that is
// replaced atomically.
#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <utility>

#include "aviary/error.h"
#include "formats/json_depth.h"
#include "formats/unique_fd.h"

namespace aviary::train {
namespace {

static_assert(std::endian::native == std::endian::little,
              "checkpoint data files hold the host's floats and are defined as little-endian");

namespace fs = std::filesystem;

constexpr std::string_view kFormat = "aviary-train-checkpoint";
constexpr char kIndexName[] = "meta.json";
constexpr char kIndexTemp[] = "meta.json.tmp";
constexpr uint64_t kMaxIndexBytes = uint64_t{16} << 20;
constexpr int kMaxJsonDepth = 64;
constexpr size_t kIoChunk = size_t{64} << 20;  // per write/read call and CRC update
constexpr const char* kRoles[] = {"params", "adam_m", "adam_v"};

[[noreturn]] void FailErrno(const std::string& path, const std::string& what, int err) {
  throw Error(path + ": " + what + ": " + std::strerror(err));
}

// FNV-1a over every entry's name, shape and offset: identifies the layout a buffer was saved
// in, so that a change of ParamLayout's order is caught even when the config is the same.
std::string LayoutHash(const ParamLayout& layout) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&](const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  };
  for (const ParamEntry& e : layout.entries()) {
    mix(e.name.data(), e.name.size() + 1);
    mix(e.shape.data(), e.shape.size() * sizeof(int64_t));
    const uint64_t offset = e.offset;
    mix(&offset, sizeof offset);
  }
  const uint64_t total = layout.total_floats();
  mix(&total, sizeof total);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

struct ConfigField {
  const char* name;
  int Rwkv7Config::*field;
  const char* words;  // for errors: "a model of 4 <words>"
};
constexpr ConfigField kConfigFields[] = {
    {"n_layer", &Rwkv7Config::n_layer, "layers"},
    {"n_embd", &Rwkv7Config::n_embd, "wide"},
    {"head_size", &Rwkv7Config::head_size, "head size"},
    {"vocab", &Rwkv7Config::vocab, "tokens of vocabulary"},
    {"n_ffn", &Rwkv7Config::n_ffn, "channel-mix width"},
    {"d_decay", &Rwkv7Config::d_decay, "decay low-rank width"},
    {"d_aaa", &Rwkv7Config::d_aaa, "in-context learning rate low-rank width"},
    {"d_mv", &Rwkv7Config::d_mv, "value residual low-rank width"},
    {"d_gate", &Rwkv7Config::d_gate, "gate low-rank width"},
};

// A file name this format writes: plain, no path, no hidden file.
bool PlainName(const std::string& s) {
  if (s.empty() || s.size() > 200 || s[0] == '.') return false;
  return std::all_of(s.begin(), s.end(), [](unsigned char c) {
    return std::isalnum(c) || c == '.' || c == '_' || c == '-';
  });
}

// ---- files ----

void WriteAll(int fd, const std::string& path, const uint8_t* data, size_t n, uLong* crc) {
  while (n > 0) {
    const size_t chunk = std::min(n, kIoChunk);
    const ssize_t w = ::write(fd, data, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      FailErrno(path, "write failed", errno);
    }
    if (crc) *crc = crc32_z(*crc, data, static_cast<size_t>(w));
    data += w;
    n -= static_cast<size_t>(w);
  }
}

// Creates `path` (which must not exist), writes the bytes, fsyncs; returns their CRC-32.
uint32_t WriteNewFileSynced(const std::string& path, const void* data, size_t n, bool exclusive) {
  UniqueFd fd(
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (exclusive ? O_EXCL : O_TRUNC), 0644));
  if (fd.get() < 0) FailErrno(path, "cannot create", errno);
  uLong crc = crc32_z(0, nullptr, 0);
  WriteAll(fd.get(), path, static_cast<const uint8_t*>(data), n, &crc);
  if (::fsync(fd.get()) != 0) FailErrno(path, "fsync failed", errno);
  if (::close(fd.Release()) != 0) FailErrno(path, "close failed", errno);
  return static_cast<uint32_t>(crc);
}

void SyncFolder(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) FailErrno(dir, "cannot open the folder", errno);
  // Some file systems cannot fsync a folder (EINVAL); the rename is then as durable as they get.
  if (::fsync(fd.get()) != 0 && errno != EINVAL) FailErrno(dir, "fsync failed", errno);
}

std::string ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) throw Error(path + ": missing: no checkpoint here");
    FailErrno(path, "cannot open", errno);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) FailErrno(path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    throw Error(path + ": " + std::to_string(st.st_size) +
                " bytes: too large for a checkpoint index");
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t r = ::read(fd.get(), text.data() + got, text.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) FailErrno(path, "read failed", errno);
    if (r == 0) throw Error(path + ": shorter than its size: changed while being read");
    got += static_cast<size_t>(r);
  }
  return text;
}

// Reads a data file whose size and CRC the index states.
AlignedVector<float> ReadDataFile(const std::string& dir, const CheckpointDataFile& file) {
  const std::string path = (fs::path(dir) / file.name).string();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) throw Error(path + ": missing (meta.json names it)");
    FailErrno(path, "cannot open", errno);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) FailErrno(path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) != file.bytes) {
    throw Error(path + ": " + std::to_string(st.st_size) + " bytes, but meta.json says " +
                std::to_string(file.bytes) + ": truncated or replaced");
  }
  AlignedVector<float> data(file.bytes / sizeof(float));
  auto* p = reinterpret_cast<uint8_t*>(data.data());
  uLong crc = crc32_z(0, nullptr, 0);
  for (uint64_t got = 0; got < file.bytes;) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(file.bytes - got, kIoChunk));
    const ssize_t r = ::read(fd.get(), p + got, want);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) FailErrno(path, "read failed", errno);
    if (r == 0) throw Error(path + ": ended early: truncated while being read");
    crc = crc32_z(crc, p + got, static_cast<size_t>(r));
    got += static_cast<uint64_t>(r);
  }
  if (static_cast<uint32_t>(crc) != file.crc32) {
    throw Error(path + ": CRC-32 does not match meta.json: the file is corrupt");
  }
  return data;
}

// The data files this format writes (any tag), and the index's temporary.
bool OwnedFileName(const std::string& name) {
  if (name == kIndexTemp) return true;
  if (name.size() < 5 || name.compare(name.size() - 4, 4, ".f32") != 0) return false;
  for (const char* role : kRoles) {
    const std::string prefix = std::string(role) + "-";
    if (name.rfind(prefix, 0) == 0) return true;
  }
  return false;
}

}  // namespace

// ---- index ----

CheckpointIndex ParseCheckpointIndex(std::string_view text, const std::string& name) {
  auto fail = [&](const std::string& problem) { throw Error(name + ": " + problem); };
  if (text.size() > kMaxIndexBytes) fail("too large for a checkpoint index");
  if (JsonDepth(text) > kMaxJsonDepth) fail("nested too deeply for a checkpoint index");
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) fail("not valid JSON: not a checkpoint index, or damaged");
  if (!j.is_object()) fail("not a JSON object: not a checkpoint index");
  auto field = [&](const char* key) -> const nlohmann::json& {
    const auto it = j.find(key);
    if (it == j.end()) fail(std::string("no \"") + key + "\"");
    return *it;
  };
  const nlohmann::json& format = field("format");
  if (!format.is_string() || format.get<std::string>() != kFormat) {
    fail("not an aviary training checkpoint (\"format\" is not \"" + std::string(kFormat) + "\")");
  }
  const nlohmann::json& version = field("version");
  if (!version.is_number_integer()) fail("\"version\" is not an integer");
  if (version.get<int64_t>() != kCheckpointVersion) {
    fail("checkpoint format version " + version.dump() + "; this aviary reads version " +
         std::to_string(kCheckpointVersion));
  }

  CheckpointIndex index;
  const nlohmann::json& step = field("step");
  if (!step.is_number_integer() || step.get<int64_t>() < 0) fail("\"step\" is not a count");
  index.meta.step = step.get<int64_t>();
  for (auto [key, out] : {std::pair{"rng_state", &index.meta.rng_state},
                          std::pair{"sampler_state", &index.meta.sampler_state}}) {
    const nlohmann::json& v = field(key);
    if (!v.is_string()) fail(std::string("\"") + key + "\" is not a string");
    *out = v.get<std::string>();
  }
  for (auto [key, out] :
       {std::pair{"options", &index.meta.options}, std::pair{"extra", &index.meta.extra}}) {
    const nlohmann::json& v = field(key);
    if (!v.is_object()) fail(std::string("\"") + key + "\" is not an object");
    *out = v;
  }

  const nlohmann::json& config = field("config");
  if (!config.is_object()) fail("\"config\" is not an object");
  Rwkv7Config c;
  for (const ConfigField& f : kConfigFields) {
    const auto it = config.find(f.name);
    if (it == config.end() || !it->is_number_integer() || it->get<int64_t>() < INT32_MIN ||
        it->get<int64_t>() > INT32_MAX) {
      fail(std::string("config.") + f.name + " is missing or not an integer");
    }
    c.*f.field = static_cast<int>(it->get<int64_t>());
  }
  try {
    c.Validate();
  } catch (const Error& e) {
    fail(e.what());
  }
  // "tune" (absent: full training) names the trainable layout of LoRA and state tuning.
  const auto tune = j.find("tune");
  if (tune == j.end()) {
    index.layout = ParamLayout::Rwkv7(c);
  } else {
    const auto mode = tune->is_object() ? tune->find("mode") : tune->end();
    if (mode == tune->end() || !mode->is_string()) fail("\"tune\" has no \"mode\"");
    if (*mode == "state") {
      index.layout = ParamLayout::Rwkv7State(c);
    } else if (*mode == "lora") {
      const auto rank = tune->find("lora_rank"), targets = tune->find("lora_targets");
      if (rank == tune->end() || !rank->is_number_integer() || targets == tune->end() ||
          !targets->is_array() ||
          !std::all_of(targets->begin(), targets->end(), [](auto& t) { return t.is_string(); })) {
        fail("\"tune\" lacks a LoRA rank or target list");
      }
      try {
        index.layout = ParamLayout::Rwkv7Lora(
            c, static_cast<int>(std::clamp<int64_t>(rank->get<int64_t>(), -1, 1 << 20)),
            targets->get<std::vector<std::string>>());
      } catch (const Error& e) {
        fail(e.what());
      }
    } else {
      fail("\"tune\" mode " + mode->dump() + " is not lora or state");
    }
  }
  const uint64_t total = index.layout.total_floats();
  const nlohmann::json& floats = field("total_floats");
  if (!floats.is_number_unsigned() || floats.get<uint64_t>() != total) {
    fail("\"total_floats\" is not the " + std::to_string(total) + " its config's layout holds");
  }
  const nlohmann::json& hash = field("layout_hash");
  if (!hash.is_string() || hash.get<std::string>() != LayoutHash(index.layout)) {
    fail(
        "written for another parameter layout than this aviary's for the same config "
        "(layout_hash differs)");
  }

  const nlohmann::json& files = field("files");
  if (!files.is_object()) fail("\"files\" is not an object");
  CheckpointDataFile* outs[] = {&index.params, &index.adam_m, &index.adam_v};
  std::set<std::string> names;
  for (int r = 0; r < 3; ++r) {
    const std::string where = std::string("files.") + kRoles[r];
    const auto it = files.find(kRoles[r]);
    if (it == files.end() || !it->is_object()) fail(where + " is missing");
    const auto fname = it->find("name"), bytes = it->find("bytes"), crc = it->find("crc32");
    if (fname == it->end() || !fname->is_string() || !PlainName(fname->get<std::string>())) {
      fail(where + ".name is not a plain file name");
    }
    if (bytes == it->end() || !bytes->is_number_unsigned() ||
        bytes->get<uint64_t>() != total * sizeof(float)) {
      fail(where + ".bytes is not " + std::to_string(total * sizeof(float)) +
           " (the layout's floats)");
    }
    if (crc == it->end() || !crc->is_number_unsigned() || crc->get<uint64_t>() > 0xffffffffu) {
      fail(where + ".crc32 is not a CRC-32");
    }
    outs[r]->name = fname->get<std::string>();
    outs[r]->bytes = bytes->get<uint64_t>();
    outs[r]->crc32 = static_cast<uint32_t>(crc->get<uint64_t>());
    if (!names.insert(outs[r]->name).second) fail(where + ".name is used twice");
  }
  return index;
}

// ---- save ----

void SaveCheckpoint(const std::string& dir, const ParamLayout& layout, const float* params,
                    const float* adam_m, const float* adam_v, const CheckpointMeta& meta) {
  if (!meta.options.is_object() || !meta.extra.is_object()) {
    throw UsageError(dir + ": checkpoint options and extra must be JSON objects");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(dir + ": cannot create the checkpoint folder: " + ec.message());

  // A tag no file in the folder has: never a file the current index (or a killed save) uses.
  std::string tag = std::to_string(meta.step);
  for (int k = 1;; ++k) {
    bool free = true;
    for (const char* role : kRoles) {
      if (fs::exists(fs::path(dir) / (std::string(role) + "-" + tag + ".f32"), ec)) free = false;
    }
    if (free) break;
    tag = std::to_string(meta.step) + "." + std::to_string(k);
  }

  const size_t bytes = layout.total_floats() * sizeof(float);
  const float* buffers[] = {params, adam_m, adam_v};
  std::vector<std::string> written;  // removed again if the save fails
  nlohmann::json files = nlohmann::json::object();
  try {
    for (int r = 0; r < 3; ++r) {
      const std::string name = std::string(kRoles[r]) + "-" + tag + ".f32";
      const std::string path = (fs::path(dir) / name).string();
      written.push_back(path);
      const uint32_t crc = WriteNewFileSynced(path, buffers[r], bytes, /*exclusive=*/true);
      files[kRoles[r]] = {{"name", name}, {"bytes", bytes}, {"crc32", crc}};
    }
    const Rwkv7Config& c = layout.config();
    nlohmann::json config = nlohmann::json::object();
    for (const ConfigField& f : kConfigFields) config[f.name] = c.*f.field;
    nlohmann::json index = {
        {"format", kFormat},
        {"version", kCheckpointVersion},
        {"step", meta.step},
        {"rng_state", meta.rng_state},
        {"sampler_state", meta.sampler_state},
        {"options", meta.options},
        {"extra", meta.extra},
        {"config", config},
        {"total_floats", layout.total_floats()},
        {"layout_hash", LayoutHash(layout)},
        {"files", files},
    };
    if (layout.tune() == "lora") {
      index["tune"] = {{"mode", "lora"},
                       {"lora_rank", layout.lora_rank()},
                       {"lora_targets", layout.lora_targets()}};
    } else if (layout.tune() == "state") {
      index["tune"] = {{"mode", "state"}};
    }
    std::string text;
    try {
      text = index.dump(2) + "\n";
    } catch (const nlohmann::json::exception&) {
      throw UsageError(dir + ": a checkpoint's states and options must be UTF-8 text");
    }
    const std::string temp = (fs::path(dir) / kIndexTemp).string();
    written.push_back(temp);
    WriteNewFileSynced(temp, text.data(), text.size(), /*exclusive=*/false);
    const std::string final_path = (fs::path(dir) / kIndexName).string();
    if (std::rename(temp.c_str(), final_path.c_str()) != 0) {
      FailErrno(final_path, "cannot rename " + temp + " to it", errno);
    }
    written.clear();  // committed: the new files are the checkpoint now
    SyncFolder(dir);
  } catch (...) {
    for (const std::string& path : written) ::unlink(path.c_str());
    throw;
  }

  // The previous checkpoint's files and anything a killed save left behind.
  std::set<std::string> keep;
  for (const char* role : kRoles) keep.insert(files[role]["name"].get<std::string>());
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (OwnedFileName(name) && !keep.count(name)) fs::remove(entry.path(), ec);
  }
}

// ---- load ----

bool HasCheckpoint(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / kIndexName, ec);
}

Checkpoint LoadCheckpoint(const std::string& dir, const ParamLayout* expected) {
  const std::string index_path = (fs::path(dir) / kIndexName).string();
  CheckpointIndex index =
      ParseCheckpointIndex(ReadSmallFile(index_path, kMaxIndexBytes), index_path);
  if (expected) {
    const Rwkv7Config& want = expected->config();
    const Rwkv7Config& have = index.layout.config();
    for (const ConfigField& f : kConfigFields) {
      if (want.*f.field != have.*f.field) {
        throw Error(index_path + ": the checkpoint's model has " + f.name + " " +
                    std::to_string(have.*f.field) + ", this run's " +
                    std::to_string(want.*f.field));
      }
    }
    if (LayoutHash(*expected) != LayoutHash(index.layout)) {
      throw Error(index_path + ": the checkpoint's parameter layout differs from this run's");
    }
  }
  Checkpoint cp{std::move(index.layout), std::move(index.meta), {}, {}, {}};
  cp.params = ReadDataFile(dir, index.params);
  cp.adam_m = ReadDataFile(dir, index.adam_m);
  cp.adam_v = ReadDataFile(dir, index.adam_v);
  if (expected) {  // keep the caller's frozen flags
    for (size_t i = 0; i < cp.layout.entries().size(); ++i) {
      cp.layout.entries()[i].trainable = expected->entries()[i].trainable;
    }
  }
  return cp;
}

void CheckSameRun(const nlohmann::json& saved, const nlohmann::json& current,
                  const std::string& dir) {
  auto differ = [&](const std::string& key, const nlohmann::json* a, const nlohmann::json* b) {
    throw UsageError(dir + ": holds another run's checkpoint (" + key + ": " +
                     (a ? a->dump() : std::string("not set")) + " there, " +
                     (b ? b->dump() : std::string("not set")) + " in this run)");
  };
  if (!saved.is_object() || !current.is_object()) {
    if (saved != current) differ("options", &saved, &current);
    return;
  }
  std::set<std::string> keys;
  for (const auto& [k, v] : saved.items()) keys.insert(k);
  for (const auto& [k, v] : current.items()) keys.insert(k);
  for (const std::string& k : keys) {
    const auto a = saved.find(k), b = current.find(k);
    const nlohmann::json* pa = a == saved.end() ? nullptr : &*a;
    const nlohmann::json* pb = b == current.end() ? nullptr : &*b;
    if (!pa || !pb || *pa != *pb) differ(k, pa, pb);
  }
}

}  // namespace aviary::train
