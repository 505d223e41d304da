// The aviary CLI's settings from environment variables. The library reads no environment: this
// is the one place that does, and it hands the values to the library as explicit options
// (RuntimeOptions, LoadOptions, HubSettings, DownloadOptions). Flags on the command line win
// over these variables, which win over the defaults.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "aviary/cache.h"
#include "aviary/runtime.h"

namespace aviary::cli {

struct Environment {
  std::optional<int> threads;              // AVIARY_THREADS: 1..1024
  std::optional<Kernels> kernels;          // AVIARY_KERNELS: fast | reference
  std::optional<Activations> activations;  // AVIARY_ACTIVATIONS: auto | int8 | f32
  std::optional<LoadMode> load_mode;       // AVIARY_LOAD: auto | mmap | read
  // cache_dir: AVIARY_CACHE_DIR, else XDG_CACHE_HOME/aviary, else HOME/.cache/aviary (else
  // ./.cache/aviary); endpoints: AVIARY_HF_ENDPOINT, AVIARY_RAW_GITHUB_ENDPOINT (trailing '/'
  // removed), else HubSettings' defaults.
  HubSettings hub;
  std::optional<long> stall_timeout_s;  // AVIARY_STALL_TIMEOUT: seconds, 1..86400
  std::optional<long> mpi_bucket_kib;   // AVIARY_MPI_BUCKET_KIB: 1..1048576
  // How an MPI launcher (mpirun) started this process, from its variables: OMPI_COMM_WORLD_SIZE
  // (else PMI_SIZE, PMIX_SIZE; 1 with PMIX_RANK alone; 0 without a launcher), the rank
  // (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK) and the processes on this machine
  // (OMPI_COMM_WORLD_LOCAL_SIZE, else 1).
  int launcher_size = 0, launcher_rank = 0, launcher_local_size = 1;
};

// A variable's value, or nullptr when unset (std::getenv in the CLI, a table in tests).
using GetEnv = std::function<const char*(const char* name)>;

// Reads every variable above through `get`; unset or empty means not given. Throws
// aviary::UsageError naming the variable, its value and the values it accepts.
Environment ReadEnvironment(const GetEnv& get);
// This process's environment, read on first use.
const Environment& ProcessEnvironment();

// The parsers the variables and the flags share. `what` names the source in errors, e.g.
// "AVIARY_THREADS" or "--threads".
int ParseThreads(std::string_view text, std::string_view what);
Kernels ParseKernels(std::string_view text, std::string_view what);
Activations ParseActivations(std::string_view text, std::string_view what);
LoadMode ParseLoadMode(std::string_view text, std::string_view what);

// The list of variables for `aviary --help`.
std::string EnvironmentHelp();

}  // namespace aviary::cli
