// A trained RWKV-7 model out of the flat parameter buffer (params.h): as the .pth BlinkDL's code
// writes and reads (official names and shapes, F32 or BF16), and as aviary's GGUF of that .pth.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/tokenizer.h"
#include "tensor/dtype.h"
#include "train/params.h"

namespace aviary::train {

// Writes every entry of `layout` (values at params + entry.offset) under its BlinkDL name in its
// .pth shape: the low-rank matrices transposed back to (C, D) / (D, C), the (C) vectors as
// (1, 1, C). `type` is kF32 or kBF16. Written as path.tmp, then renamed (callers that have
// inputs check RefuseOverwritingInputs first).
void ExportRwkv7Pth(const std::string& path, const ParamLayout& layout, const float* params,
                    DType type = DType::kF32);

// Converts the .pth at `pth_path` (as ExportRwkv7Pth wrote it) to GGUF at `gguf_path` with the
// code of `aviary convert`, keeping each tensor's type, so that the GGUF gives the same logits.
// `tokenizer` is embedded (GGUF readers take the vocabulary from the file); null embeds the
// byte vocabulary for a 256-token model and is an error for any other size. The file is
// written as gguf_path.tmp, loaded back, then renamed.
void ExportRwkv7Gguf(const std::string& gguf_path, const std::string& pth_path,
                     std::shared_ptr<const TokenizerData> tokenizer = nullptr);

// LoRA: writes `path` (adapter.pth) with the adapters of `layout` (ParamLayout::Rwkv7Lora) under
// BlinkDL/RWKV-PEFT's names and PEFT's shapes, "blocks.N.att.key.lora_A" (R, in) and
// "...lora_B" (out, R), float32; and beside it adapter.json, which `aviary merge-lora` reads:
//   {"format": "aviary-lora", "version": 1, "lora_rank": R, "lora_alpha": A, "targets": [...],
//    "base_model": PATH, "base_fingerprint": N, "n_layer": L, "n_embd": C, "n_ffn": F}
// (the merged matrix is W + (A / R) B A).
void ExportLoraAdapter(const std::string& path, const ParamLayout& layout, const float* params,
                       double lora_alpha, const std::string& base_model, uint64_t base_fingerprint);

// What adapter.json says: ParseLoraAdapterMeta reads the text ExportLoraAdapter writes.
// Throws aviary::Error starting with `name` for text that is not JSON, another format, a
// missing or mistyped field, a rank outside 1..65536, an alpha that is not positive and finite,
// sizes outside 1..2^20, or a target RWKV-PEFT does not name.
struct LoraAdapterMeta {
  int rank = 0;
  double alpha = 0;
  std::vector<std::string> targets;
  std::string base_model;
  uint64_t base_fingerprint = 0;
  int n_layer = 0, n_embd = 0, n_ffn = 0;
};
LoraAdapterMeta ParseLoraAdapterMeta(std::string_view json, const std::string& name);

// State tuning: writes DIR/state.avstate, the start state of `base_model` (an aviary State file,
// as `aviary chat --load-state` and `aviary serve --state` read it) whose wkv parts are the
// tuned ones of `layout` (ParamLayout::Rwkv7State) and whose token-shift parts are zero, and
// DIR/state.pth with RWKV-PEFT's "blocks.N.att.time_state" (H, N, N).
void ExportTunedState(const std::string& dir, const ParamLayout& layout, const float* params,
                      const std::string& base_model);

}  // namespace aviary::train
