// aviary info --model FILE: what the file holds.
#include <cstdio>

#include "cli_common.h"

namespace aviary::cli {

void RegisterInfo(CLI::App& app) {
  struct Options {
    std::string model, tokenizer;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd =
      app.add_subcommand("info", "Show a model's version, shape, weight types and size");
  AddModelOptions(cmd, &o->model, &o->tokenizer);
  cmd->callback([o] {
    const LoadedModel m = LoadModel(o->model, o->tokenizer);
    const ModelInfo& i = m.model->info();
    std::string types;
    for (const auto& [name, count] : i.tensor_types) {
      types += (types.empty() ? "" : ", ") + name + " x" + std::to_string(count);
    }
    const size_t state_bytes = m.model->NewState().size_bytes();
    std::printf("file:         %s\n", i.path.c_str());
    std::printf("format:       %s\n", i.format.c_str());
    std::printf("version:      RWKV %s\n", std::string(ArchName(i.arch)).c_str());
    std::printf("layers:       %d\n", i.n_layer);
    std::printf("embedding:    %d\n", i.n_embd);
    std::printf("heads:        %d x %d\n", i.n_head, i.head_size);
    std::printf("ffn:          %d\n", i.n_ffn);
    std::printf("vocab:        %d\n", i.n_vocab);
    std::printf("tokenizer:    %s\n", m.tokenizer->name().c_str());
    std::printf("weight types: %s (main %s)\n", types.c_str(), i.main_type.c_str());
    std::printf("parameters:   %llu (%.2f M)\n", static_cast<unsigned long long>(i.n_params),
                i.n_params / 1e6);
    std::printf("file size:    %llu bytes (%.2f MiB)\n",
                static_cast<unsigned long long>(i.file_size), i.file_size / 1048576.0);
    std::printf("state size:   %zu bytes (%.1f KiB)\n", state_bytes, state_bytes / 1024.0);
    for (const std::string& note : i.notes) std::printf("converted:    %s\n", note.c_str());
  });
}

}  // namespace aviary::cli
