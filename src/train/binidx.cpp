#include "train/binidx.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "aviary/error.h"
#include "formats/mapped_file.h"

namespace aviary::train {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};

template <typename T>
T Load(const uint8_t* p) {  // little-endian, unaligned: the .idx arrays start at byte 34
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool IsFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

int TokenTypeBytes(TokenType type) {
  switch (type) {
    case TokenType::kUInt8:
    case TokenType::kInt8: return 1;
    case TokenType::kInt16:
    case TokenType::kUInt16: return 2;
    case TokenType::kInt32: return 4;
    case TokenType::kInt64: return 8;
  }
  return 0;
}

const char* TokenTypeName(TokenType type) {
  switch (type) {
    case TokenType::kUInt8: return "uint8";
    case TokenType::kInt8: return "int8";
    case TokenType::kInt16: return "int16";
    case TokenType::kInt32: return "int32";
    case TokenType::kInt64: return "int64";
    case TokenType::kUInt16: return "uint16";
  }
  return "?";
}

TokenType TokenTypeForVocab(int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenType::kUInt16 : TokenType::kInt32;
}

BinidxHeader ParseBinidxIndex(std::span<const uint8_t> idx, uint64_t bin_bytes,
                              const std::string& name) {
  auto fail = [&](const std::string& problem) { return Error(name + ": " + problem); };
  if (idx.size() < kBinidxHeaderBytes) {
    throw fail("truncated binidx index: " + std::to_string(idx.size()) +
               " bytes, the header alone takes " + std::to_string(kBinidxHeaderBytes));
  }
  if (std::memcmp(idx.data(), kMagic, sizeof kMagic) != 0) {
    throw fail("not a binidx index (the file does not start with \"MMIDIDX\")");
  }
  const uint8_t* p = idx.data();
  const uint64_t version = Load<uint64_t>(p + 9);
  if (version != 1) throw fail("binidx index version " + std::to_string(version) + ", not 1");
  const uint8_t code = p[17];
  BinidxHeader h;
  switch (code) {
    case 1:
    case 2:
    case 3:
    case 4:
    case 5:
    case 8: h.type = static_cast<TokenType>(code); break;
    case 6:
    case 7: throw fail("dtype code " + std::to_string(code) + " is a float type, not token ids");
    default: throw fail("unknown dtype code " + std::to_string(code));
  }
  h.items = Load<uint64_t>(p + 18);
  const uint64_t doc_entries = Load<uint64_t>(p + 26);
  const uint64_t room = idx.size() - kBinidxHeaderBytes;
  // Items take 12 bytes (size and pointer), document entries 8; compare without overflow.
  if (h.items > room / 12 || doc_entries > (room - h.items * 12) / 8) {
    throw fail("truncated binidx index: the header declares " + std::to_string(h.items) +
               " items and " + std::to_string(doc_entries) + " document entries, more than " +
               std::to_string(idx.size()) + " bytes hold");
  }
  const uint64_t used = kBinidxHeaderBytes + h.items * 12 + doc_entries * 8;
  if (used != idx.size()) {
    throw fail(std::to_string(idx.size() - used) + " bytes after the document index");
  }

  const int item_bytes = TokenTypeBytes(h.type);
  const uint8_t* sizes = p + kBinidxHeaderBytes;
  const uint8_t* pointers = sizes + h.items * 4;
  uint64_t next = 0;  // byte offset where the next item must start
  for (uint64_t i = 0; i < h.items; ++i) {
    const int32_t size = Load<int32_t>(sizes + i * 4);
    const int64_t pointer = Load<int64_t>(pointers + i * 8);
    if (size < 0)
      throw fail("item " + std::to_string(i) + " has negative size " + std::to_string(size));
    if (pointer < 0 || static_cast<uint64_t>(pointer) != next) {
      throw fail("item " + std::to_string(i) + " starts at byte " + std::to_string(pointer) +
                 " of the .bin, not " + std::to_string(next) + " where the item before it ends");
    }
    const uint64_t bytes = static_cast<uint64_t>(size) * item_bytes;
    if (bytes > bin_bytes - next) {
      throw fail("item " + std::to_string(i) + " ends at byte " + std::to_string(next + bytes) +
                 ", past the end of the .bin (" + std::to_string(bin_bytes) + " bytes)");
    }
    next += bytes;
  }
  if (next != bin_bytes) {
    throw fail("the items cover " + std::to_string(next) + " bytes but the .bin has " +
               std::to_string(bin_bytes));
  }
  h.tokens = bin_bytes / item_bytes;

  if (doc_entries == 0) throw fail("empty document index (it starts with 0 in every binidx)");
  const uint8_t* docs = pointers + h.items * 8;
  int64_t previous = 0;
  for (uint64_t d = 0; d < doc_entries; ++d) {
    const int64_t first = Load<int64_t>(docs + d * 8);
    if ((d == 0 && first != 0) || first < previous || static_cast<uint64_t>(first) > h.items) {
      throw fail("document index entry " + std::to_string(d) + " is " + std::to_string(first) +
                 (d == 0 ? ", not 0"
                         : " (after " + std::to_string(previous) + ", with " +
                               std::to_string(h.items) + " items)"));
    }
    previous = first;
  }
  h.documents = doc_entries - 1;
  return h;
}

std::string BinidxPrefix(const std::string& path) {
  if (EndsWith(path, ".bin") || EndsWith(path, ".idx")) return path.substr(0, path.size() - 4);
  return path;
}

bool BinidxExists(const std::string& prefix) {
  return IsFile(prefix + ".bin") && IsFile(prefix + ".idx");
}

TokenDataset::TokenDataset(const std::string& path) : prefix_(BinidxPrefix(path)) {
  const std::string idx_path = prefix_ + ".idx";
  const std::string bin_path = prefix_ + ".bin";
  if (!IsFile(idx_path) && !IsFile(bin_path)) {
    throw Error(path + ": no binidx dataset here (neither " + idx_path + " nor " + bin_path +
                " exists)");
  }
  const MappedFile idx(idx_path);
  bin_ = std::make_unique<MappedFile>(bin_path);  // "file is empty" for a dataset of no tokens
  header_ = ParseBinidxIndex(idx.bytes(), bin_->bytes().size(), idx_path);
}

TokenDataset::~TokenDataset() = default;

void TokenDataset::Get(uint64_t offset, size_t count, int32_t vocab_size, int32_t* out) const {
  if (offset > size() || count > size() - offset) {
    throw Error(prefix_ + ".bin: tokens " + std::to_string(offset) + ".." +
                std::to_string(offset + count) + " asked of a stream of " + std::to_string(size()));
  }
  const uint8_t* base = bin_->bytes().data();
  auto check = [&](int64_t v, size_t i) {
    if (v < 0 || v >= vocab_size) {
      throw Error(prefix_ + ".bin: token " + std::to_string(offset + i) + " is " +
                  std::to_string(v) + ", outside the vocabulary of " + std::to_string(vocab_size));
    }
    out[i] = static_cast<int32_t>(v);
  };
  auto copy = [&]<typename T>(T) {
    const uint8_t* p = base + offset * sizeof(T);
    for (size_t i = 0; i < count; ++i) check(Load<T>(p + i * sizeof(T)), i);
  };
  switch (header_.type) {
    case TokenType::kUInt8: copy(uint8_t{}); break;
    case TokenType::kInt8: copy(int8_t{}); break;
    case TokenType::kInt16: copy(int16_t{}); break;
    case TokenType::kUInt16: copy(uint16_t{}); break;
    case TokenType::kInt32: copy(int32_t{}); break;
    case TokenType::kInt64: copy(int64_t{}); break;
  }
}

// ---------------------------------------------------------------------------------------------

BinidxWriter::BinidxWriter(const std::string& prefix, TokenType type)
    : prefix_(prefix), type_(type) {
  if (type != TokenType::kUInt16 && type != TokenType::kInt32) {
    throw Error(prefix + ": binidx writer writes uint16 or int32 tokens, not " +
                std::string(TokenTypeName(type)));
  }
  const std::string path = prefix + ".bin.tmp";
  bin_ = std::fopen(path.c_str(), "wb");
  if (!bin_) throw Error(path + ": cannot create: " + std::strerror(errno));
}

BinidxWriter::~BinidxWriter() {
  if (bin_) std::fclose(bin_);
  if (!finished_) {
    std::remove((prefix_ + ".bin.tmp").c_str());
    std::remove((prefix_ + ".idx.tmp").c_str());
  }
}

void BinidxWriter::Add(std::span<const int32_t> tokens) {
  if (finished_) throw Error(prefix_ + ": binidx writer used after Finish");
  const int bytes = TokenTypeBytes(type_);
  const int64_t max = type_ == TokenType::kUInt16 ? 65535 : std::numeric_limits<int32_t>::max();
  buffer_.resize(tokens.size() * bytes);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t t = tokens[i];
    if (t < 0 || t > max) {
      throw Error(prefix_ + ".bin: token " + std::to_string(t) + " does not fit " +
                  TokenTypeName(type_));
    }
    if (type_ == TokenType::kUInt16) {
      const uint16_t v = static_cast<uint16_t>(t);
      std::memcpy(&buffer_[i * 2], &v, 2);
    } else {
      std::memcpy(&buffer_[i * 4], &t, 4);
    }
  }
  // An item's size is an int32: a longer document continues in the next item.
  size_t done = 0;
  while (done < tokens.size()) {
    const uint64_t room = std::numeric_limits<int32_t>::max() - item_tokens_;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(room, tokens.size() - done));
    if (n > 0 && std::fwrite(buffer_.data() + done * bytes, bytes, n, bin_) != n) {
      throw Error(prefix_ + ".bin.tmp: cannot write: " + std::strerror(errno));
    }
    done += n;
    item_tokens_ += n;
    tokens_ += n;
    if (item_tokens_ == static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) CloseItem();
  }
}

void BinidxWriter::CloseItem() {
  if (item_tokens_ == 0) return;
  sizes_.push_back(static_cast<int32_t>(item_tokens_));
  item_tokens_ = 0;
}

void BinidxWriter::EndDocument() {
  CloseItem();
  if (sizes_.size() > doc_index_.back()) doc_index_.push_back(sizes_.size());
}

void BinidxWriter::Finish() {
  if (finished_) return;
  EndDocument();
  const std::string bin_tmp = prefix_ + ".bin.tmp";
  const std::string idx_tmp = prefix_ + ".idx.tmp";
  const bool bin_ok = std::fflush(bin_) == 0 && std::fclose(bin_) == 0;
  bin_ = nullptr;
  if (!bin_ok) throw Error(bin_tmp + ": cannot write: " + std::strerror(errno));

  std::vector<uint8_t> idx(kBinidxHeaderBytes + sizes_.size() * 12 + doc_index_.size() * 8);
  uint8_t* p = idx.data();
  auto put = [&p](const auto& v) {
    std::memcpy(p, &v, sizeof v);
    p += sizeof v;
  };
  std::memcpy(p, kMagic, sizeof kMagic);
  p += sizeof kMagic;
  put(uint64_t{1});
  put(static_cast<uint8_t>(type_));
  put(static_cast<uint64_t>(sizes_.size()));
  put(static_cast<uint64_t>(doc_index_.size()));
  for (int32_t size : sizes_) put(size);
  int64_t pointer = 0;
  for (int32_t size : sizes_) {
    put(pointer);
    pointer += int64_t{size} * TokenTypeBytes(type_);
  }
  for (uint64_t first : doc_index_) put(static_cast<int64_t>(first));

  std::FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (!f) throw Error(idx_tmp + ": cannot create: " + std::strerror(errno));
  const bool idx_ok = std::fwrite(idx.data(), 1, idx.size(), f) == idx.size();
  if (std::fclose(f) != 0 || !idx_ok) {
    throw Error(idx_tmp + ": cannot write: " + std::strerror(errno));
  }
  if (std::rename(bin_tmp.c_str(), (prefix_ + ".bin").c_str()) != 0 ||
      std::rename(idx_tmp.c_str(), (prefix_ + ".idx").c_str()) != 0) {
    throw Error(prefix_ +
                ": cannot rename the finished dataset into place: " + std::strerror(errno));
  }
  finished_ = true;
}

}  // namespace aviary::train
