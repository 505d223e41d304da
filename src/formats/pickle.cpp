// The restricted unpickler (see pickle.h). Objects live in an arena and refer to each other by
// index, so there is no reference counting, no recursion over objects and no leak even when a
// hostile pickle builds cycles through the memo; the arena, the stack, the marks and the memo
// are all bounded.
#include "formats/pickle.h"
#include "formats/printable.h"

#include <cstdio>
#include <cstring>
#include <string_view>
#include <unordered_map>

#include "aviary/error.h"

namespace aviary::pickle {

const char* StorageTypeName(StorageType type) {
  switch (type) {
    case StorageType::kFloat: return "FloatStorage";
    case StorageType::kHalf: return "HalfStorage";
    case StorageType::kBFloat16: return "BFloat16Storage";
    case StorageType::kDouble: return "DoubleStorage";
    case StorageType::kLong: return "LongStorage";
    case StorageType::kInt: return "IntStorage";
    case StorageType::kShort: return "ShortStorage";
    case StorageType::kChar: return "CharStorage";
    case StorageType::kByte: return "ByteStorage";
    case StorageType::kBool: return "BoolStorage";
  }
  return "?";
}

int StorageElementSize(StorageType type) {
  switch (type) {
    case StorageType::kDouble:
    case StorageType::kLong: return 8;
    case StorageType::kFloat:
    case StorageType::kInt: return 4;
    case StorageType::kHalf:
    case StorageType::kBFloat16:
    case StorageType::kShort: return 2;
    case StorageType::kChar:
    case StorageType::kByte:
    case StorageType::kBool: return 1;
  }
  return 1;
}

namespace {

constexpr size_t kMaxValues = size_t{1} << 22;
constexpr size_t kMaxStack = size_t{1} << 22;
constexpr size_t kMaxMarks = 64;
constexpr size_t kMaxMemo = size_t{1} << 22;
constexpr size_t kMaxDims = 16;
constexpr size_t kMaxGlobalLine = 256;

// What the allow-listed globals are, as values: we interpret them, never import them.
enum class Global : uint8_t { kOrderedDict, kRebuildTensorV2, kRebuildParameter, kStorageType };

enum class Kind : uint8_t {
  kNone,
  kBool,
  kInt,
  kString,
  kTuple,
  kList,
  kDict,
  kGlobal,
  kStorage,
  kTensor
};

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kNone: return "None";
    case Kind::kBool: return "a bool";
    case Kind::kInt: return "an int";
    case Kind::kString: return "a string";
    case Kind::kTuple: return "a tuple";
    case Kind::kList: return "a list";
    case Kind::kDict: return "a dict";
    case Kind::kGlobal: return "a class or function";
    case Kind::kStorage: return "a storage";
    case Kind::kTensor: return "a tensor";
  }
  return "?";
}

struct Value {
  Kind kind = Kind::kNone;
  int64_t i = 0;  // bool/int value; Global; index into storages_/tensors_
  StorageType storage_type = StorageType::kFloat;  // for Global::kStorageType
  std::string s;                                   // string; global's dotted name
  std::vector<uint32_t> items;  // tuple/list items; dict: key, value, key, value, ...
};

struct Storage {
  std::string key;
  StorageType type;
  int64_t numel;
};

// Every opcode of pickle protocols 0-5, for error messages.
const char* OpcodeName(uint8_t op) {
  switch (op) {
    case '(': return "MARK";
    case '.': return "STOP";
    case '0': return "POP";
    case '1': return "POP_MARK";
    case '2': return "DUP";
    case 'F': return "FLOAT";
    case 'I': return "INT";
    case 'J': return "BININT";
    case 'K': return "BININT1";
    case 'L': return "LONG";
    case 'M': return "BININT2";
    case 'N': return "NONE";
    case 'P': return "PERSID";
    case 'Q': return "BINPERSID";
    case 'R': return "REDUCE";
    case 'S': return "STRING";
    case 'T': return "BINSTRING";
    case 'U': return "SHORT_BINSTRING";
    case 'V': return "UNICODE";
    case 'X': return "BINUNICODE";
    case 'a': return "APPEND";
    case 'b': return "BUILD";
    case 'c': return "GLOBAL";
    case 'd': return "DICT";
    case '}': return "EMPTY_DICT";
    case 'e': return "APPENDS";
    case 'g': return "GET";
    case 'h': return "BINGET";
    case 'i': return "INST";
    case 'j': return "LONG_BINGET";
    case 'l': return "LIST";
    case ']': return "EMPTY_LIST";
    case 'o': return "OBJ";
    case 'p': return "PUT";
    case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT";
    case 's': return "SETITEM";
    case 't': return "TUPLE";
    case ')': return "EMPTY_TUPLE";
    case 'u': return "SETITEMS";
    case 'G': return "BINFLOAT";
    case 0x80: return "PROTO";
    case 0x81: return "NEWOBJ";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 0x85: return "TUPLE1";
    case 0x86: return "TUPLE2";
    case 0x87: return "TUPLE3";
    case 0x88: return "NEWTRUE";
    case 0x89: return "NEWFALSE";
    case 0x8a: return "LONG1";
    case 0x8b: return "LONG4";
    case 0x8c: return "SHORT_BINUNICODE";
    case 0x8d: return "BINUNICODE8";
    case 0x8e: return "BINBYTES8";
    case 0x8f: return "EMPTY_SET";
    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";
    case 0x92: return "NEWOBJ_EX";
    case 0x93: return "STACK_GLOBAL";
    case 0x94: return "MEMOIZE";
    case 0x95: return "FRAME";
    case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";
    default: return nullptr;
  }
}

// Names in errors: 120 bytes at most.
std::string Printable(std::string_view s) { return aviary::Printable(s, 120); }

class Unpickler {
 public:
  Unpickler(std::span<const uint8_t> bytes, const std::string& name) : in_(bytes), name_(name) {}

  std::vector<std::pair<std::string, TensorRecord>> Run() {
    const uint32_t top = Execute();
    const Value& root = values_[top];
    if (root.kind != Kind::kDict) {
      Fail(std::string("the top-level object is ") + KindName(root.kind) + ", not a state dict");
    }
    std::vector<std::pair<std::string, TensorRecord>> out;
    out.reserve(root.items.size() / 2);
    for (size_t k = 0; k + 1 < root.items.size(); k += 2) {
      const Value& key = values_[root.items[k]];
      const Value& val = values_[root.items[k + 1]];
      if (key.kind != Kind::kString) {
        Fail(std::string("a state dict key is ") + KindName(key.kind) + ", not a string");
      }
      if (val.kind != Kind::kTensor) {
        Fail("state dict entry '" + Printable(key.s) + "' is " + KindName(val.kind) +
             ", not a tensor");
      }
      out.emplace_back(key.s, tensors_[val.i]);
    }
    return out;
  }

 private:
  [[noreturn]] void Fail(const std::string& problem) const {
    throw Error(name_ + ": pickle: " + problem);
  }
  [[noreturn]] void FailAt(size_t offset, const std::string& problem) const {
    Fail(problem + " (at byte " + std::to_string(offset) + ")");
  }

  // ---- input ----
  const uint8_t* Take(size_t n, const char* what) {
    if (in_.size() - pos_ < n) {
      FailAt(pos_, std::string("truncated while reading ") + what);
    }
    const uint8_t* p = in_.data() + pos_;
    pos_ += n;
    return p;
  }
  uint64_t ReadLE(size_t n, const char* what) {
    const uint8_t* p = Take(n, what);
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
  }
  std::string ReadLine(const char* what) {
    const size_t start = pos_;
    while (pos_ < in_.size() && in_[pos_] != '\n') {
      if (pos_ - start >= kMaxGlobalLine) FailAt(start, std::string(what) + " is too long");
      ++pos_;
    }
    if (pos_ == in_.size()) FailAt(start, std::string("truncated while reading ") + what);
    std::string line(reinterpret_cast<const char*>(in_.data() + start), pos_ - start);
    ++pos_;
    return line;
  }

  // ---- objects and the stack ----
  uint32_t New(Value v) {
    if (values_.size() >= kMaxValues) Fail("too many objects");
    values_.push_back(std::move(v));
    return static_cast<uint32_t>(values_.size() - 1);
  }
  void Push(uint32_t id) {
    if (stack_.size() >= kMaxStack) Fail("stack too deep");
    stack_.push_back(id);
  }
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  uint32_t Pop(size_t op_at) {
    if (stack_.size() <= Floor()) FailAt(op_at, "stack underflow");
    const uint32_t id = stack_.back();
    stack_.pop_back();
    return id;
  }
  uint32_t Top(size_t op_at) const {
    if (stack_.size() <= Floor()) FailAt(op_at, "stack underflow");
    return stack_.back();
  }
  // Pops everything above the innermost mark, and the mark.
  std::vector<uint32_t> PopToMark(size_t op_at) {
    if (marks_.empty()) FailAt(op_at, "no MARK on the stack");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<uint32_t> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  void Memo(uint64_t index, uint32_t id, size_t op_at) {
    if (memo_.size() >= kMaxMemo && !memo_.count(index)) FailAt(op_at, "memo too large");
    memo_[index] = id;
  }
  uint32_t Recall(uint64_t index, size_t op_at) const {
    auto it = memo_.find(index);
    if (it == memo_.end()) FailAt(op_at, "memo key " + std::to_string(index) + " is not set");
    return it->second;
  }

  Value& At(uint32_t id) { return values_[id]; }

  int64_t AsInt(uint32_t id, const char* what) {
    const Value& v = values_[id];
    if (v.kind != Kind::kInt) Fail(std::string(what) + " is " + KindName(v.kind) + ", not an int");
    return v.i;
  }
  const std::vector<uint32_t>& AsTuple(uint32_t id, const char* what) {
    const Value& v = values_[id];
    if (v.kind != Kind::kTuple) {
      Fail(std::string(what) + " is " + KindName(v.kind) + ", not a tuple");
    }
    return v.items;
  }

  // ---- the allow-list ----
  uint32_t MakeGlobal(const std::string& module, const std::string& qualname, size_t op_at) {
    Value v;
    v.kind = Kind::kGlobal;
    v.s = module + "." + qualname;
    static const std::pair<const char*, StorageType> kStorages[] = {
        {"FloatStorage", StorageType::kFloat},       {"HalfStorage", StorageType::kHalf},
        {"BFloat16Storage", StorageType::kBFloat16}, {"DoubleStorage", StorageType::kDouble},
        {"LongStorage", StorageType::kLong},         {"IntStorage", StorageType::kInt},
        {"ShortStorage", StorageType::kShort},       {"CharStorage", StorageType::kChar},
        {"ByteStorage", StorageType::kByte},         {"BoolStorage", StorageType::kBool}};
    if (module == "collections" && qualname == "OrderedDict") {
      v.i = static_cast<int64_t>(Global::kOrderedDict);
    } else if (module == "torch._utils" && qualname == "_rebuild_tensor_v2") {
      v.i = static_cast<int64_t>(Global::kRebuildTensorV2);
    } else if (module == "torch._utils" && qualname == "_rebuild_parameter") {
      v.i = static_cast<int64_t>(Global::kRebuildParameter);
    } else {
      bool found = false;
      if (module == "torch") {
        for (const auto& [n, type] : kStorages) {
          if (qualname == n) {
            v.i = static_cast<int64_t>(Global::kStorageType);
            v.storage_type = type;
            found = true;
          }
        }
      }
      if (!found) FailAt(op_at, "refusing pickle global " + Printable(v.s));
    }
    return New(std::move(v));
  }

  // REDUCE: only the allow-listed callables, interpreted here.
  uint32_t Reduce(uint32_t callable, uint32_t args_id, size_t op_at) {
    const Value& f = values_[callable];
    if (f.kind != Kind::kGlobal) {
      FailAt(op_at, std::string("refusing REDUCE on ") + KindName(f.kind));
    }
    const auto& args = AsTuple(args_id, "REDUCE arguments");
    switch (static_cast<Global>(f.i)) {
      case Global::kOrderedDict: {
        if (!args.empty()) FailAt(op_at, "refusing collections.OrderedDict with arguments");
        Value d;
        d.kind = Kind::kDict;
        return New(std::move(d));
      }
      case Global::kRebuildParameter: {
        // _rebuild_parameter(data, requires_grad, backward_hooks[, ...]): the tensor itself.
        if (args.empty() || values_[args[0]].kind != Kind::kTensor) {
          FailAt(op_at, "torch._utils._rebuild_parameter needs a tensor");
        }
        return args[0];
      }
      case Global::kRebuildTensorV2: return RebuildTensor(args, op_at);
      case Global::kStorageType: break;
    }
    FailAt(op_at, "refusing REDUCE on " + Printable(f.s));
  }

  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
  // [, metadata])
  uint32_t RebuildTensor(std::vector<uint32_t> args, size_t op_at) {
    if (args.size() < 4 || args.size() > 7) {
      FailAt(op_at,
             "torch._utils._rebuild_tensor_v2 with " + std::to_string(args.size()) + " arguments");
    }
    const Value& storage = values_[args[0]];
    if (storage.kind != Kind::kStorage) {
      FailAt(op_at, std::string("tensor storage is ") + KindName(storage.kind) +
                        ", not a persistent storage reference");
    }
    const Storage& st = storages_[storage.i];
    TensorRecord t;
    t.storage_key = st.key;
    t.type = st.type;
    t.storage_numel = st.numel;
    t.storage_offset = AsInt(args[1], "tensor storage offset");
    const auto& size = AsTuple(args[2], "tensor size");
    const auto& stride = AsTuple(args[3], "tensor stride");
    if (size.size() != stride.size()) {
      FailAt(op_at, "tensor size and stride have different lengths");
    }
    if (size.size() > kMaxDims) FailAt(op_at, "tensor has too many dimensions");
    for (uint32_t id : size) t.shape.push_back(AsInt(id, "a tensor dimension"));
    for (uint32_t id : stride) t.strides.push_back(AsInt(id, "a tensor stride"));
    Value v;
    v.kind = Kind::kTensor;
    v.i = static_cast<int64_t>(tensors_.size());
    tensors_.push_back(std::move(t));
    return New(std::move(v));
  }

  // BINPERSID: ('storage', <storage type>, key, location, numel).
  uint32_t PersistentLoad(uint32_t pid, size_t op_at) {
    const Value& v = values_[pid];
    if (v.kind != Kind::kTuple || v.items.size() != 5) {
      FailAt(op_at, "persistent id is not a ('storage', type, key, location, size) tuple");
    }
    const Value& tag = values_[v.items[0]];
    const Value& type = values_[v.items[1]];
    const Value& key = values_[v.items[2]];
    const Value& location = values_[v.items[3]];
    if (tag.kind != Kind::kString || tag.s != "storage") {
      FailAt(op_at, "persistent id is not a storage reference");
    }
    if (type.kind != Kind::kGlobal || static_cast<Global>(type.i) != Global::kStorageType) {
      FailAt(op_at, "persistent id names no torch storage type");
    }
    if (key.kind != Kind::kString || location.kind != Kind::kString) {
      FailAt(op_at, "persistent id key or location is not a string");
    }
    const int64_t numel = AsInt(v.items[4], "storage size");
    if (numel < 0) FailAt(op_at, "negative storage size");
    Value s;
    s.kind = Kind::kStorage;
    s.i = static_cast<int64_t>(storages_.size());
    storages_.push_back({key.s, type.storage_type, numel});
    return New(std::move(s));
  }

  uint32_t Execute() {
    while (true) {
      const size_t at = pos_;
      const uint8_t op = *Take(1, "an opcode");
      switch (op) {
        case 0x80: {  // PROTO
          const uint8_t proto = *Take(1, "the protocol");
          if (proto > 5) FailAt(at, "unsupported pickle protocol " + std::to_string(proto));
          break;
        }
        case 0x95: {  // FRAME: a length prefix we do not need.
          const uint64_t n = ReadLE(8, "a frame length");
          if (n > in_.size() - pos_) FailAt(at, "frame runs past the end");
          break;
        }
        case '}':
        case ']':
        case ')': {
          Value v;
          v.kind = op == '}' ? Kind::kDict : op == ']' ? Kind::kList : Kind::kTuple;
          Push(New(std::move(v)));
          break;
        }
        case '(':
          if (marks_.size() >= kMaxMarks) FailAt(at, "MARKs nested too deeply");
          marks_.push_back(stack_.size());
          break;
        case 'X':
        case 0x8c: {  // BINUNICODE, SHORT_BINUNICODE
          const uint64_t n =
              op == 'X' ? ReadLE(4, "a string length") : ReadLE(1, "a string length");
          const uint8_t* p = Take(n, "a string");
          Value v;
          v.kind = Kind::kString;
          v.s.assign(reinterpret_cast<const char*>(p), n);
          Push(New(std::move(v)));
          break;
        }
        case 'J':
        case 'K':
        case 'M': {  // BININT (signed 32), BININT1, BININT2 (unsigned)
          Value v;
          v.kind = Kind::kInt;
          if (op == 'J') {
            v.i = static_cast<int32_t>(ReadLE(4, "an int"));
          } else {
            v.i = static_cast<int64_t>(ReadLE(op == 'K' ? 1 : 2, "an int"));
          }
          Push(New(std::move(v)));
          break;
        }
        case 0x8a: {  // LONG1: n bytes, little-endian two's complement
          const uint64_t n = ReadLE(1, "a long length");
          if (n > 8) FailAt(at, "integer of " + std::to_string(n) + " bytes is too large");
          uint64_t u = ReadLE(n, "a long");
          if (n > 0 && n < 8 && (u >> (8 * n - 1)) & 1) u |= ~uint64_t{0} << (8 * n);
          Value v;
          v.kind = Kind::kInt;
          v.i = static_cast<int64_t>(u);
          Push(New(std::move(v)));
          break;
        }
        case 0x88:
        case 0x89: {  // NEWTRUE, NEWFALSE
          Value v;
          v.kind = Kind::kBool;
          v.i = op == 0x88;
          Push(New(std::move(v)));
          break;
        }
        case 'N': Push(New(Value{})); break;
        case 't': {  // TUPLE
          Value v;
          v.kind = Kind::kTuple;
          v.items = PopToMark(at);
          Push(New(std::move(v)));
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          const int n = op - 0x84;
          Value v;
          v.kind = Kind::kTuple;
          v.items.resize(n);
          for (int i = n - 1; i >= 0; --i) v.items[i] = Pop(at);
          Push(New(std::move(v)));
          break;
        }
        case 's': {  // SETITEM
          const uint32_t value = Pop(at), key = Pop(at);
          Value& d = At(Top(at));
          if (d.kind != Kind::kDict) FailAt(at, std::string("SETITEM on ") + KindName(d.kind));
          d.items.push_back(key);
          d.items.push_back(value);
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<uint32_t> kv = PopToMark(at);
          if (kv.size() % 2) FailAt(at, "SETITEMS with an odd number of items");
          Value& d = At(Top(at));
          if (d.kind != Kind::kDict) FailAt(at, std::string("SETITEMS on ") + KindName(d.kind));
          d.items.insert(d.items.end(), kv.begin(), kv.end());
          break;
        }
        case 'a': {  // APPEND
          const uint32_t item = Pop(at);
          Value& l = At(Top(at));
          if (l.kind != Kind::kList) FailAt(at, std::string("APPEND on ") + KindName(l.kind));
          l.items.push_back(item);
          break;
        }
        case 'e': {  // APPENDS
          std::vector<uint32_t> items = PopToMark(at);
          Value& l = At(Top(at));
          if (l.kind != Kind::kList) FailAt(at, std::string("APPENDS on ") + KindName(l.kind));
          l.items.insert(l.items.end(), items.begin(), items.end());
          break;
        }
        case 'q': Memo(ReadLE(1, "a memo index"), Top(at), at); break;
        case 'r': Memo(ReadLE(4, "a memo index"), Top(at), at); break;
        case 0x94:  // MEMOIZE
          Memo(memo_.size(), Top(at), at);
          break;
        case 'h': Push(Recall(ReadLE(1, "a memo index"), at)); break;
        case 'j': Push(Recall(ReadLE(4, "a memo index"), at)); break;
        case 'c': {  // GLOBAL module\nname\n
          const std::string module = ReadLine("a global's module");
          const std::string qualname = ReadLine("a global's name");
          Push(MakeGlobal(module, qualname, at));
          break;
        }
        case 0x93: {  // STACK_GLOBAL (protocol 4): the same allow-list
          const uint32_t qualname = Pop(at), module = Pop(at);
          if (values_[module].kind != Kind::kString || values_[qualname].kind != Kind::kString) {
            FailAt(at, "STACK_GLOBAL needs two strings");
          }
          Push(MakeGlobal(values_[module].s, values_[qualname].s, at));
          break;
        }
        case 'Q':  // BINPERSID
          Push(PersistentLoad(Pop(at), at));
          break;
        case 'R': {  // REDUCE
          const uint32_t args = Pop(at), callable = Pop(at);
          Push(Reduce(callable, args, at));
          break;
        }
        case 'b': {  // BUILD: only an OrderedDict's attribute dict (e.g. _metadata), ignored.
          Pop(at);
          const Value& target = values_[Top(at)];
          if (target.kind != Kind::kDict) {
            FailAt(at, std::string("refusing BUILD on ") + KindName(target.kind));
          }
          break;
        }
        case '.': {  // STOP
          const uint32_t result = Pop(at);
          if (!marks_.empty()) FailAt(at, "STOP with an open MARK");
          return result;
        }
        default: {
          const char* opname = OpcodeName(op);
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          FailAt(at, std::string("refusing pickle opcode ") + (opname ? opname : "unknown") + " (" +
                         hex + ")");
        }
      }
    }
  }

  std::span<const uint8_t> in_;
  const std::string& name_;
  size_t pos_ = 0;
  std::vector<Value> values_;
  std::vector<uint32_t> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, uint32_t> memo_;
  std::vector<Storage> storages_;
  std::vector<TensorRecord> tensors_;
};

}  // namespace

std::vector<std::pair<std::string, TensorRecord>> ReadStateDict(std::span<const uint8_t> bytes,
                                                                const std::string& name) {
  return Unpickler(bytes, name).Run();
}

}  // namespace aviary::pickle
