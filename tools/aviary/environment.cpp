#include "environment.h"

#include <charconv>
#include <cstdlib>

#include "aviary/error.h"

namespace aviary::cli {
namespace {

[[noreturn]] void Reject(std::string_view what, std::string_view text, std::string_view allowed) {
  throw UsageError(std::string(what) + " is '" + std::string(text) + "'; it must be " +
                   std::string(allowed));
}

std::optional<long> ParseLong(std::string_view text) {
  long value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

std::string WithoutTrailingSlashes(std::string text) {
  while (!text.empty() && text.back() == '/') text.pop_back();
  return text;
}

}  // namespace

int ParseThreads(std::string_view text, std::string_view what) {
  const std::optional<long> n = ParseLong(text);
  if (!n || *n < 1 || *n > 1024) Reject(what, text, "a thread count from 1 to 1024");
  return static_cast<int>(*n);
}

Kernels ParseKernels(std::string_view text, std::string_view what) {
  if (text == "fast") return Kernels::kFast;
  if (text == "reference") return Kernels::kReference;
  Reject(what, text, "'fast' or 'reference'");
}

Activations ParseActivations(std::string_view text, std::string_view what) {
  if (text == "auto") return Activations::kAuto;
  if (text == "int8") return Activations::kInt8;
  if (text == "f32") return Activations::kF32;
  Reject(what, text, "'auto', 'int8' or 'f32'");
}

LoadMode ParseLoadMode(std::string_view text, std::string_view what) {
  if (text == "auto") return LoadMode::kAuto;
  if (text == "mmap") return LoadMode::kMmap;
  if (text == "read") return LoadMode::kRead;
  Reject(what, text, "'auto', 'mmap' or 'read'");
}

Environment ReadEnvironment(const GetEnv& get) {
  auto value = [&](const char* name) -> std::optional<std::string_view> {
    const char* v = get(name);
    if (!v || !*v) return std::nullopt;
    return std::string_view(v);
  };
  Environment env;
  if (auto v = value("AVIARY_THREADS")) env.threads = ParseThreads(*v, "AVIARY_THREADS");
  if (auto v = value("AVIARY_KERNELS")) env.kernels = ParseKernels(*v, "AVIARY_KERNELS");
  if (auto v = value("AVIARY_ACTIVATIONS")) {
    env.activations = ParseActivations(*v, "AVIARY_ACTIVATIONS");
  }
  if (auto v = value("AVIARY_LOAD")) env.load_mode = ParseLoadMode(*v, "AVIARY_LOAD");
  if (auto v = value("AVIARY_CACHE_DIR")) {
    env.hub.cache_dir = std::string(*v);
  } else if (auto xdg = value("XDG_CACHE_HOME")) {
    env.hub.cache_dir = std::string(*xdg) + "/aviary";
  } else {
    env.hub.cache_dir = std::string(value("HOME").value_or(".")) + "/.cache/aviary";
  }
  if (auto v = value("AVIARY_HF_ENDPOINT")) {
    env.hub.hf_endpoint = WithoutTrailingSlashes(std::string(*v));
  }
  if (auto v = value("AVIARY_RAW_GITHUB_ENDPOINT")) {
    env.hub.raw_github_endpoint = WithoutTrailingSlashes(std::string(*v));
  }
  if (auto v = value("AVIARY_STALL_TIMEOUT")) {
    const std::optional<long> s = ParseLong(*v);
    if (!s || *s < 1 || *s > 86400) {
      throw UsageError("AVIARY_STALL_TIMEOUT must be a number of seconds (1..86400), not '" +
                       std::string(*v) + "'");
    }
    env.stall_timeout_s = *s;
  }
  if (auto v = value("AVIARY_MPI_BUCKET_KIB")) {
    const std::optional<long> s = ParseLong(*v);
    if (!s || *s < 1 || *s > (1 << 20)) {
      throw UsageError("AVIARY_MPI_BUCKET_KIB must be a size in KiB (1..1048576), not '" +
                       std::string(*v) + "'");
    }
    env.mpi_bucket_kib = *s;
  }
  auto number = [&](std::initializer_list<const char*> names) -> std::optional<long> {
    for (const char* name : names) {
      if (auto v = value(name)) return ParseLong(*v).value_or(0);
    }
    return std::nullopt;
  };
  env.launcher_size = static_cast<int>(std::max(
      0L, number({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
              .value_or(value("PMIX_RANK") ? 1 : 0)));
  env.launcher_rank =
      static_cast<int>(std::max(0L, number({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"})
                                        .value_or(0)));
  env.launcher_local_size =
      static_cast<int>(std::max(1L, number({"OMPI_COMM_WORLD_LOCAL_SIZE"}).value_or(1)));
  return env;
}

const Environment& ProcessEnvironment() {
  static const Environment env =
      ReadEnvironment([](const char* name) { return std::getenv(name); });
  return env;
}

std::string EnvironmentHelp() {
  return "Environment variables (flags given on the command line win):\n"
         "  AVIARY_THREADS=N            threads that run a model (1..1024; default: the hardware "
         "threads)\n"
         "  AVIARY_KERNELS=fast|reference   SIMD kernels, or the scalar reference (default fast)\n"
         "  AVIARY_ACTIVATIONS=auto|int8|f32   rounded activations where the CPU has them: "
         "8-bit for\n"
         "                              quantized, bfloat16 for F16/BF16 weights (auto), "
         "8-bit only, or none\n"
         "  AVIARY_LOAD=auto|mmap|read  how model files are held: mapped, read into huge pages, "
         "or auto\n"
         "                              (read for files of 512 MiB and more)\n"
         "  AVIARY_CACHE_DIR=DIR        the cache folder (default $XDG_CACHE_HOME/aviary, else "
         "~/.cache/aviary)\n"
         "  AVIARY_HF_ENDPOINT=URL      where pull fetches models (default "
         "https://huggingface.co)\n"
         "  AVIARY_RAW_GITHUB_ENDPOINT=URL   where pull fetches tokenizer files (default\n"
         "                              https://raw.githubusercontent.com)\n"
         "  AVIARY_STALL_TIMEOUT=S      seconds under 1 KiB/s before a download counts as "
         "stalled (default 60)\n"
         "  AVIARY_MPI_BUCKET_KIB=K     train under mpirun: KiB of gradients per all-reduce "
         "(default 4096)\n"
         "A value outside these is an error (exit 2).";
}

}  // namespace aviary::cli
