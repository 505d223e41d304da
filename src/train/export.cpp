#include "train/export.h"

#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/gguf_writer.h"
#include "formats/mapped_file.h"
#include "formats/output_file.h"
#include "formats/pth_writer.h"
#include "formats/weight_file.h"

namespace aviary::train {

void ExportRwkv7Pth(const std::string& path, const ParamLayout& layout, const float* params,
                    DType type) {
  std::vector<PthTensor> tensors;
  std::vector<std::vector<float>> transposed;  // the low-rank matrices in the .pth's order
  tensors.reserve(layout.entries().size());
  for (const ParamEntry& e : layout.entries()) {
    const float* data = params + e.offset;
    if (e.transposed_in_pth) {
      // [rows, cols] here -> [cols, rows] in the .pth.
      const size_t rows = static_cast<size_t>(e.shape.at(0)),
                   cols = static_cast<size_t>(e.shape.at(1));
      std::vector<float>& t = transposed.emplace_back(e.size);
      for (size_t r = 0; r < rows; ++r) {
        for (size_t c = 0; c < cols; ++c) t[c * rows + r] = data[r * cols + c];
      }
      data = t.data();
    }
    tensors.push_back({e.name, e.pth_shape, data});
  }
  PthWriteOptions options;
  options.type = type;
  WritePth(path, tensors, options);
}

void ExportRwkv7Gguf(const std::string& gguf_path, const std::string& pth_path,
                     std::shared_ptr<const TokenizerData> tokenizer) {
  RefuseOverwritingInputs(gguf_path, {pth_path});
  auto file = std::make_shared<MappedFile>(pth_path, LoadMode::kMmap);
  WeightFile wf = ReadWeightFile(file->bytes(), pth_path);
  wf.backing = file;
  const std::unique_ptr<Model> model = Model::LoadFromMemory(file->bytes(), pth_path);
  const ModelInfo& info = model->info();
  if (info.arch != Arch::kV7) throw Error(pth_path + ": not an RWKV-7 model");
  if (!tokenizer) {
    if (info.n_vocab != 256) {
      throw UsageError(gguf_path + ": a GGUF of a " + std::to_string(info.n_vocab) +
                       "-token model needs its tokenizer to embed");
    }
    auto bytes = std::make_shared<TokenizerData>();
    bytes->kind = "bytes";
    for (int i = 0; i < 256; ++i) bytes->tokens.emplace_back(1, static_cast<char>(i));
    tokenizer = std::move(bytes);
  }
  GgufWriteOptions options;  // no type: every tensor keeps the .pth's
  options.tokenizer = std::move(tokenizer);
  OutputFile out(gguf_path);
  WriteGguf(wf, info, options, out.temp_path());
  LoadOptions check;
  check.load_mode = LoadMode::kMmap;
  Model::Load(out.temp_path(), check);  // the result must load
  out.Commit();
}

}  // namespace aviary::train
