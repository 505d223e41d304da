// aviary train: train an RWKV-7 model from scratch or finetune one (src/train/trainer.h), or
// plot a run's losses.
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "cli_common.h"
#include "environment.h"
#include "hub/download.h"
#include "tensor/thread_pool.h"
#include "train/comm.h"
#include "train/trainer.h"

namespace aviary::cli {
namespace {

namespace fs = std::filesystem;

// Set by SIGINT/SIGTERM; the training loop stops after the current step.
volatile std::sig_atomic_t g_stop = 0;

struct TrainCli {
  train::TrainOptions o;
  std::string resume, plot, plot_out;
  int threads = 0;
  CLI::App* cmd = nullptr;
};

std::string Bytes(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / 1048576.0);
  return buf;
}

// --tokenizer's names: the vocabulary files `aviary pull` puts into the cache (or that lie
// beside the --init model).
train::TrainingTokenizer ResolveTokenizer(const std::string& spec, int model_vocab,
                                          const std::string& init_model) {
  std::string name = spec;
  if (name.empty()) {  // the --init model's own, by its vocabulary size; bytes from scratch
    if (model_vocab == 0 || model_vocab == 256) {
      name = "bytes";
    } else if (model_vocab == 65536) {
      name = "world";
    } else if (model_vocab == 50277 || model_vocab == 50304) {
      name = "neox";
    } else {
      throw UsageError("the model's vocabulary of " + std::to_string(model_vocab) +
                       " tokens is not one aviary knows: pass --tokenizer FILE");
    }
  }
  if (name == "bytes") return train::LoadTrainingTokenizer("bytes");
  if (name == "world" || name == "neox") {
    const char* file = name == "world" ? "rwkv_vocab_v20230424.txt" : "20B_tokenizer.json";
    std::vector<std::string> dirs;
    if (!init_model.empty()) dirs.push_back(fs::path(init_model).parent_path().string());
    if (!Hub().cache_dir.empty()) dirs.push_back(Hub().cache_dir);
    for (const std::string& dir : dirs) {
      const fs::path p = fs::path(dir.empty() ? "." : dir) / file;
      if (fs::exists(p)) return train::LoadTrainingTokenizer(fs::absolute(p).string());
    }
    throw UsageError(std::string("--tokenizer ") + name + ": " + file +
                     " is not in the model's folder or the cache; `aviary pull` a " + name +
                     " model first, or pass --tokenizer FILE");
  }
  if (!fs::exists(name)) throw UsageError("--tokenizer " + name + ": no such file");
  return train::LoadTrainingTokenizer(fs::absolute(name).string());
}

void PrintSummary(const train::RunSummary& s, int processes) {
  if (s.tune == "full") {
    std::fprintf(stderr, "%s: %s, %.2fM parameters\n", s.resumed ? "resuming" : "training",
                 s.model.c_str(), s.parameters / 1e6);
  } else {
    std::fprintf(stderr, "%s: %s of %s (frozen, %s), %.3fM trainable parameters\n",
                 s.resumed ? "resuming" : "tuning",
                 s.tune == "lora" ? "LoRA adapters" : "the state", s.model.c_str(),
                 Bytes(s.frozen_bytes).c_str(), s.parameters / 1e6);
  }
  std::fprintf(stderr, "data: %llu training tokens, %llu validation tokens\n",
               static_cast<unsigned long long>(s.train_tokens),
               static_cast<unsigned long long>(s.validation_tokens));
  if (processes > 1) {
    const int lo = s.batch / processes, hi = (s.batch + processes - 1) / processes;
    const std::string each =
        lo == hi ? std::to_string(lo) : std::to_string(lo) + " or " + std::to_string(hi);
    std::fprintf(stderr, "data parallel: %d processes, %s of the %d windows of a step each\n",
                 processes, each.c_str(), s.batch);
  }
  std::fprintf(stderr, "memory: weights %s, gradients %s, Adam moments %s, activations %s%s%s\n",
               Bytes(s.weight_bytes).c_str(), Bytes(s.gradient_bytes).c_str(),
               Bytes(s.adam_bytes).c_str(), Bytes(s.activation_bytes).c_str(),
               s.chunk_state_bytes ? ", chunk start states " : "",
               s.chunk_state_bytes ? Bytes(s.chunk_state_bytes).c_str() : "");
  if (s.resumed) std::fprintf(stderr, "from step %lld\n", static_cast<long long>(s.start_step));
}

void Train(TrainCli& c, train::Comm& comm);

void RunTrain(TrainCli& c) {
  if (!c.plot.empty()) {
    if (c.plot_out.empty()) throw UsageError("--plot LOG needs -o PNG");
    train::PlotLoss(c.plot, c.plot_out);
    std::printf("wrote %s\n", c.plot_out.c_str());
    return;
  }
  const Environment& env = ProcessEnvironment();
  train::CommOptions options;
  options.launched = env.launcher_size;
  options.rank = env.launcher_rank;
  if (env.mpi_bucket_kib) options.bucket_floats = static_cast<size_t>(*env.mpi_bucket_kib) * 256;
  train::Comm& comm = train::InitWorldComm(options);
  if (comm.size() == 1) return Train(c, comm);
  // Under mpirun an error on any rank ends the whole job, said once: the other ranks wait
  // for the next exchange forever otherwise. A rank other than 0 waits a moment first, since
  // most errors (a bad option, bad data) happen on every rank and rank 0's abort then ends it.
  try {
    Train(c, comm);
  } catch (const std::exception& e) {
    const bool usage = dynamic_cast<const UsageError*>(&e) != nullptr;
    if (comm.rank() != 0) sleep(3);
    std::string where;
    if (comm.rank() != 0) where = "rank " + std::to_string(comm.rank()) + " on " + comm.host() + ": ";
    const bool known = dynamic_cast<const Error*>(&e) != nullptr;
    std::fprintf(stderr, "aviary: %s%s%s\n", where.c_str(), known ? "" : "internal error: ",
                 e.what());
    std::fflush(stderr);
    comm.Abort(usage ? 2 : known ? 1 : 3);
  }
}

void Train(TrainCli& c, train::Comm& comm) {
  const bool leader = comm.rank() == 0;  // under mpirun only rank 0 talks
  RuntimeOptions r;
  r.threads = c.threads > 0 ? c.threads : ProcessEnvironment().threads.value_or(0);
  if (r.threads == 0) {
    // Several ranks on one machine share its cores.
    const int ranks_here = ProcessEnvironment().launcher_local_size;
    if (ranks_here > 1) r.threads = std::max(1, HardwareThreads() / ranks_here);
  }
  r.kernels = ProcessEnvironment().kernels.value_or(Kernels::kFast);
  Runtime runtime(r);
  // --init takes a file or the name of a model pulled into the cache, as --model does.
  if (!c.o.init_model.empty())
    c.o.init_model = ResolveModelArgument(c.o.init_model, Hub().cache_dir);
  const std::string init = c.o.init_model;
  auto tokenizers = [&init](const std::string& spec, int vocab) {
    return ResolveTokenizer(spec, vocab, init);
  };
  std::unique_ptr<train::Trainer> trainer;
  if (!c.resume.empty()) {
    // A resumed run keeps its own options: only its length and the threads may change.
    for (const char* flag :
         {"--data",         "--tokenizer",  "--init",         "--layers",     "--embd",
          "--ctx-len",      "--chunk-len",  "--grad-chunks",  "--batch",      "--lr",
          "--lr-final",     "--warmup",     "--weight-decay", "--grad-clip",  "--seed",
          "--val-fraction", "--eval-every", "--eval-windows", "--save-every", "--pth-type",
          "--out",          "--tune",       "--lora-rank",    "--lora-alpha", "--lora-targets"}) {
      if (c.cmd->count(flag) > 0) {
        throw UsageError(std::string("--resume continues the run with its own options: ") + flag +
                         " cannot be given with it (only --steps and --threads)");
      }
    }
    trainer = train::Trainer::Resume(c.resume, c.cmd->count("--steps") ? c.o.steps : 0, tokenizers,
                                     runtime);
  } else {
    // --lora-rank alone asks for LoRA.
    if (c.cmd->count("--lora-rank") > 0 && c.cmd->count("--tune") == 0) c.o.tune = "lora";
    trainer = train::Trainer::Start(c.o, tokenizers, runtime);
  }
  const train::RunSummary& s = trainer->summary();
  const std::string dir = c.resume.empty() ? c.o.out_dir : c.resume;
  if (leader) PrintSummary(s, comm.size());
  const bool live = isatty(STDERR_FILENO);
  double last_val = -1;
  // Ctrl-C or SIGTERM: finish the step, save the checkpoint, stop; a second one kills. (Under
  // mpirun a signal to any rank stops every rank at the same step.)
  g_stop = 0;
  auto on_signal = [](int sig) {
    g_stop = 1;
    std::signal(sig, SIG_DFL);
  };
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const bool finished = trainer->Run(
      [&](const train::StepReport& p) {
        if (!leader) return;
        if (p.val_loss >= 0) last_val = p.val_loss;
        char val[32] = "-";
        if (last_val >= 0) std::snprintf(val, sizeof val, "%.4f", last_val);
        if (p.step == 0) {
          std::fprintf(stderr, "step 0/%lld: validation loss %s\n", static_cast<long long>(p.steps),
                       val);
          return;
        }
        char line[256];
        std::snprintf(line, sizeof line,
                      "step %lld/%lld  loss %.4f  val %s  %.0f tok/s  lr %.2e  elapsed %s  ETA %s",
                      static_cast<long long>(p.step), static_cast<long long>(p.steps), p.loss, val,
                      p.tokens_per_second, p.lr, hub::FormatDuration(p.elapsed_seconds).c_str(),
                      hub::FormatDuration(p.eta_seconds).c_str());
        const bool last = p.step == p.steps;
        if (live) {
          std::fprintf(stderr, "\r\033[K%s%s", line, last ? "\n" : "");
        } else if (p.step % 10 == 0 || p.val_loss >= 0 || last || p.step == 1) {
          std::fprintf(stderr, "%s\n", line);
        }
      },
      [] { return g_stop != 0; });
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (!finished) {
    if (comm.size() > 1) {
      comm.Finalize();  // every rank stopped at the same step: the job ends cleanly
      if (!leader) std::_Exit(130);
    }
    if (live) std::fprintf(stderr, "\n");
    std::fprintf(stderr,
                 "stopped: the checkpoint in %s/checkpoint holds the last step; continue with "
                 "aviary train --resume %s\n",
                 dir.c_str(), dir.c_str());
    std::fflush(stdout);
    std::_Exit(130);  // the shell's code for a run ended by SIGINT
  }
  if (!leader) return;
  const char* outputs = s.tune == "lora"    ? "%s/adapter.pth and %s/adapter.json"
                        : s.tune == "state" ? "%s/state.avstate and %s/state.pth"
                                            : "%s/model.pth and %s/model.gguf";
  std::printf("wrote ");
  std::printf(outputs, dir.c_str(), dir.c_str());
  std::printf(" (checkpoint in %s/checkpoint, log in %s/log.jsonl)\n", dir.c_str(), dir.c_str());
  CheckStdout();
}

}  // namespace

void RegisterTrain(CLI::App& app) {
  auto c = std::make_shared<TrainCli>();
  train::TrainOptions& o = c->o;
  CLI::App* cmd = app.add_subcommand(
      "train", "Train an RWKV-7 model from scratch or finetune one; --plot draws a run's losses");
  c->cmd = cmd;
  cmd->add_option("--data", o.data,
                  "Training text: plain text files (each one document), JSONL ({\"text\": ...} per "
                  "line) or an RWKV-LM binidx dataset (PREFIX.bin + PREFIX.idx)");
  cmd->add_option("--tokenizer", o.tokenizer,
                  "bytes, world, neox or a vocabulary file (default: the --init model's own; "
                  "bytes from scratch)");
  cmd->add_option("--init", o.init_model,
                  "Finetune this RWKV-7 model: a file (.pth, safetensors, GGUF, rwkv.cpp .bin; "
                  "any weight type, widened to float) or a model pulled into the cache");
  cmd->add_option("--layers", o.layers, "From scratch: number of layers")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--embd", o.embd, "From scratch: width (a multiple of 64, or below 64)")
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--ctx-len", o.ctx_len, "Tokens per training window")->capture_default_str();
  cmd->add_option("--chunk-len", o.chunk_len,
                  "Longer context: run each window in chunks of N tokens, the state carried "
                  "forward and its gradient back; memory follows N (0 = the whole window)")
      ->capture_default_str();
  cmd->add_option("--grad-chunks", o.grad_chunks,
                  "With --chunk-len: the gradient flows back through at most N chunks (0 = all)")
      ->capture_default_str();
  cmd->add_option("--batch", o.batch, "Windows per step")->capture_default_str();
  cmd->add_option("--steps", o.steps, "Optimizer steps in the run")->capture_default_str();
  cmd->add_option("--lr", o.lr, "Peak learning rate (after warmup)")->capture_default_str();
  cmd->add_option("--lr-final", o.lr_final, "Learning rate at the last step (cosine decay)")
      ->capture_default_str();
  cmd->add_option("--warmup", o.warmup, "Warmup steps (rate from 1% to --lr)")
      ->capture_default_str();
  cmd->add_option("--weight-decay", o.weight_decay,
                  "AdamW weight decay of the 2-D weight matrices (0 = off)")
      ->capture_default_str();
  cmd->add_option("--grad-clip", o.grad_clip, "Clip the gradient's global norm (0 = off)")
      ->capture_default_str();
  cmd->add_option("--seed", o.seed, "Seed of the initial weights and the window order")
      ->capture_default_str();
  cmd->add_option("--val-fraction", o.val_fraction,
                  "Fraction of the tokens, at the end of the data, held out for validation")
      ->capture_default_str();
  cmd->add_option("--eval-every", o.eval_every, "Validation loss every N steps (0 = at the end)")
      ->capture_default_str();
  cmd->add_option("--eval-windows", o.eval_windows,
                  "Validation windows scored each time (at most; spread over the held-out tail)")
      ->capture_default_str();
  cmd->add_option("--save-every", o.save_every, "Checkpoint every N steps (0 = at the end)")
      ->capture_default_str();
  cmd->add_option("--pth-type", o.pth_type,
                  "Type of model.pth's weights: f32 (as trained) or bf16 (as BlinkDL releases)")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--tune", o.tune,
                  "What to train: full (every weight), lora (adapters on the frozen --init "
                  "model; writes adapter.pth) or state (the frozen --init model's initial state; "
                  "writes state.avstate)")
      ->check(CLI::IsMember({"full", "lora", "state"}))
      ->capture_default_str();
  cmd->add_option("--lora-rank", o.lora_rank, "LoRA: the adapters' rank R (implies --tune lora)");
  cmd->add_option("--lora-alpha", o.lora_alpha,
                  "LoRA: the adapters' scale is alpha / R (default: alpha = R)");
  cmd->add_option("--lora-targets", o.lora_targets,
                  "LoRA: the matrices adapted in every layer, comma-separated: att.receptance, "
                  "att.key, att.value, att.output, ffn.key, ffn.value (default: all six)")
      ->delimiter(',');
  cmd->add_option("--threads", c->threads,
                  "Threads (default: $AVIARY_THREADS, else the hardware threads)")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--out", o.out_dir,
                  "Run directory: log.jsonl, checkpoint/, model.pth, model.gguf, data/");
  cmd->add_option("--resume", c->resume,
                  "Continue the run in this directory exactly where its checkpoint left it");
  cmd->add_option("--plot", c->plot, "Plot a run's log.jsonl (with -o PNG) instead of training");
  cmd->add_option("-o,--output", c->plot_out, "PNG file that --plot writes");
  cmd->callback([c] { RunTrain(*c); });
}

}  // namespace aviary::cli
