#include "train/import.h"

#include <cstring>
#include <map>
#include <memory>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/mapped_file.h"
#include "formats/weight_file.h"

namespace aviary::train {
namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::vector<int64_t> WithoutLeadingOnes(std::vector<int64_t> shape) {
  while (shape.size() > 1 && shape.front() == 1) shape.erase(shape.begin());
  return shape;
}

// "RWKV-6", "RWKV-5.2": how people name the versions.
std::string VersionName(Arch arch) {
  std::string v(ArchName(arch));
  if (!v.empty() && v[0] == 'v') v.erase(0, 1);
  if (v.size() > 2 && v.compare(v.size() - 2, 2, ".0") == 0) v.resize(v.size() - 2);
  return "RWKV-" + v;
}

// Every element of `t` as float, row by row (a quantized row is whole blocks).
void Widen(const Tensor& t, float* out) {
  const int64_t rows = t.rows(), cols = t.cols();
  for (int64_t r = 0; r < rows; ++r) DequantizeRow(t.type, t.row(r), out + r * cols, cols);
}

// The model file mapped and read, its RWKV-7 config checked as aviary train needs it.
struct OpenedRwkv7 {
  WeightFile wf;
  Rwkv7Config config;
  std::string format;
  uint64_t fingerprint = 0, file_size = 0;
};

OpenedRwkv7 OpenRwkv7(const std::string& model_path) {
  const auto file = std::make_shared<MappedFile>(model_path, LoadMode::kMmap);
  // Loading checks every name and shape inference needs and tells the sizes.
  const std::unique_ptr<Model> model = Model::LoadFromMemory(file->bytes(), model_path);
  const ModelInfo& info = model->info();
  if (info.arch != Arch::kV7) {
    throw Error("aviary train works on RWKV-7 models; " + model_path + " is " +
                VersionName(info.arch));
  }
  WeightFile wf = ReadWeightFile(file->bytes(), model_path);
  wf.backing = file;
  auto fail = [&](const std::string& problem) { throw Error(model_path + ": " + problem); };
  auto get = [&](const std::string& name) -> const Tensor& {
    const Tensor* t = wf.Find(name);
    if (!t) fail("missing tensor '" + name + "'");
    return *t;
  };

  Rwkv7Config c;
  c.n_layer = info.n_layer;
  c.n_embd = info.n_embd;
  c.head_size = info.head_size;
  c.vocab = info.n_vocab;
  c.n_ffn = info.n_ffn;
  // Low-rank widths: rows of the [D, C] down-projections (layer 1's v1: layer 0 has none).
  auto rank = [&](const std::string& name) {
    const Tensor& t = get(name);
    return static_cast<int>(WithoutLeadingOnes(t.shape).front());
  };
  c.d_decay = rank("blocks.0.att.w1");
  c.d_aaa = rank("blocks.0.att.a1");
  c.d_gate = rank("blocks.0.att.g1");
  c.d_mv = c.n_layer > 1 ? rank("blocks.1.att.v1")
                         : Rwkv7Config::Official(c.n_layer, c.n_embd, c.vocab).d_mv;
  try {
    c.Validate();
  } catch (const Error& e) {
    fail(e.what());
  }

  return {std::move(wf), c, info.format, info.fingerprint, info.file_size};
}

// Widens every entry of `layout` from the file into `params` (layout.total_floats()), the
// unused layer-0 v0/v1/v2 filled; counts the stored types read.
void FillParams(const WeightFile& wf, const ParamLayout& layout, const std::string& model_path,
                float* params, std::map<std::string, int>& widened) {
  const Rwkv7Config& c = layout.config();
  auto fail = [&](const std::string& problem) { throw Error(model_path + ": " + problem); };
  auto get = [&](const std::string& name) -> const Tensor& {
    const Tensor* t = wf.Find(name);
    if (!t) fail("missing tensor '" + name + "'");
    return *t;
  };
  std::vector<float> mixes;  // one layer's x_rwkvag
  for (const ParamEntry& e : layout.entries()) {
    float* dst = params + e.offset;
    const size_t dot = e.name.find('.', 7);  // "blocks.N." ends here
    const bool in_block = e.name.rfind("blocks.", 0) == 0;
    const std::string block = in_block ? e.name.substr(0, dot + 1) : "";
    const std::string suffix = in_block ? e.name.substr(dot + 1) : e.name;
    if (block == "blocks.0." && (suffix == "att.v0" || suffix == "att.v1" || suffix == "att.v2")) {
      if (suffix == "att.v0") {
        const int C = c.n_embd;
        for (int i = 0; i < C; ++i) {
          const float linear = C > 1 ? static_cast<float>(i) / (C - 1) - 0.5f : 0.0f;
          dst[i] = 0.73f - 0.4f * linear;
        }
      }
      continue;  // v1, v2: zeros
    }
    // x_r .. x_g: the rows of the stacked x_rwkvag.
    static const std::string kMixes[] = {"att.x_r", "att.x_w", "att.x_k",
                                         "att.x_v", "att.x_a", "att.x_g"};
    int mix = -1;
    for (int s = 0; s < 6; ++s) {
      if (suffix == kMixes[s]) mix = s;
    }
    if (mix >= 0) {
      const Tensor& t = get(block + "att.x_rwkvag");
      if (t.numel() != 6 * static_cast<int64_t>(e.size)) {
        fail("tensor '" + t.name + "' has shape " + ShapeText(t.shape) + ", expected [6, " +
             std::to_string(e.size) + "]");
      }
      if (mix == 0) {
        mixes.resize(6 * e.size);
        Widen(t, mixes.data());
        widened[std::string(DTypeName(t.type))]++;
      }
      std::memcpy(dst, mixes.data() + mix * e.size, e.size * sizeof(float));
      continue;
    }
    const Tensor& t = get(e.name);
    // Vectors and r_k may be stored with other leading or flattened dimensions; matrices must
    // have exactly this shape.
    const bool matrix = e.shape.size() == 2 && suffix != "att.r_k";
    if (t.numel() != static_cast<int64_t>(e.size) ||
        (matrix && WithoutLeadingOnes(t.shape) != e.shape)) {
      const bool low_rank = suffix.size() == 6 && suffix.rfind("att.", 0) == 0 &&
                            (suffix[5] == '1' || suffix[5] == '2');
      fail("tensor '" + e.name + "' has shape " + ShapeText(t.shape) + ", expected " +
           ShapeText(e.shape) +
           (low_rank ? " (aviary train needs one width per low-rank kind in every layer)" : ""));
    }
    Widen(t, dst);
    widened[std::string(DTypeName(t.type))]++;
  }
}

std::string TypesRead(const std::map<std::string, int>& widened) {
  std::string types;
  for (const auto& [type, n] : widened) {
    types += (types.empty() ? "" : ", ") + type + " x" + std::to_string(n);
  }
  return types;
}

}  // namespace

ImportedRwkv7 LoadRwkv7Params(const std::string& model_path) {
  const OpenedRwkv7 opened = OpenRwkv7(model_path);
  ImportedRwkv7 out{ParamLayout::Rwkv7(opened.config), {}, {}};
  out.params.assign(out.layout.total_floats(), 0.0f);
  std::map<std::string, int> widened;  // stored type -> tensors
  FillParams(opened.wf, out.layout, model_path, out.params.data(), widened);
  out.notes.push_back("read " + TypesRead(widened) + " tensors as F32 from " + opened.format);
  out.notes.push_back(
      "filled the unused blocks.0.att.v0/v1/v2 (v0 as RWKV-LM initialises it, "
      "v1 and v2 zero)");
  return out;
}

size_t FrozenRwkv7::StoredBytes() const {
  size_t bytes = emb->nbytes + head->nbytes;
  for (const auto& layer : matrices) {
    for (const Tensor* t : layer) bytes += t->nbytes;
  }
  return bytes;
}

std::unique_ptr<const FrozenRwkv7> LoadFrozenRwkv7(const std::string& model_path) {
  OpenedRwkv7 opened = OpenRwkv7(model_path);
  auto out = std::make_unique<FrozenRwkv7>();
  out->path = model_path;
  out->fingerprint = opened.fingerprint;
  out->file_size = opened.file_size;
  out->file = std::move(opened.wf);
  const Rwkv7Config& c = opened.config;
  out->small_layout = ParamLayout::Rwkv7Small(c);
  out->small.assign(out->small_layout.total_floats(), 0.0f);
  std::map<std::string, int> widened, kept;
  FillParams(out->file, out->small_layout, model_path, out->small.data(), widened);
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    const Tensor* t = out->file.Find(name);
    if (!t) throw Error(model_path + ": missing tensor '" + name + "'");
    if (t->rows() != rows || t->cols() != cols) {
      throw Error(model_path + ": tensor '" + name + "' has shape " + ShapeText(t->shape) +
                  ", expected " + ShapeText({rows, cols}));
    }
    kept[std::string(DTypeName(t->type))]++;
    return t;
  };
  out->emb = matrix("emb.weight", c.vocab, c.n_embd);
  out->head = matrix("head.weight", c.vocab, c.n_embd);
  for (int l = 0; l < c.n_layer; ++l) {
    auto& layer = out->matrices.emplace_back();
    for (int m = 0; m < kRwkv7LayerMatrices; ++m) {
      const auto [rows, cols] = Rwkv7MatrixShape(c, m);
      layer[m] = matrix("blocks." + std::to_string(l) + "." + kRwkv7MatrixNames[m] + ".weight",
                        rows, cols);
    }
  }
  out->notes.push_back("read " + TypesRead(widened) + " small tensors as F32 and kept " +
                       TypesRead(kept) + " large matrices as stored, from " + opened.format);
  return out;
}

}  // namespace aviary::train
