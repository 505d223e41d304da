// The CLI's environment reader (tools/aviary/environment.h): every variable parsed, bad values
// rejected with the variable named, defaults where unset.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "aviary/error.h"
#include "environment.h"

namespace aviary::cli {
namespace {

// The environment as a table; names not in it are unset.
Environment Read(const std::map<std::string, std::string>& vars) {
  return ReadEnvironment([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

// The UsageError message for this environment, or "" when it is accepted.
std::string ErrorOf(const std::map<std::string, std::string>& vars) {
  try {
    Read(vars);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

TEST(CliEnvironment, UnsetMeansDefaults) {
  const Environment env = Read({{"HOME", "/home/u"}});
  EXPECT_FALSE(env.threads);
  EXPECT_FALSE(env.kernels);
  EXPECT_FALSE(env.activations);
  EXPECT_FALSE(env.load_mode);
  EXPECT_FALSE(env.stall_timeout_s);
  EXPECT_EQ(env.hub.cache_dir, "/home/u/.cache/aviary");
  EXPECT_EQ(env.hub.hf_endpoint, HubSettings().hf_endpoint);
  EXPECT_EQ(env.hub.raw_github_endpoint, HubSettings().raw_github_endpoint);
  // Empty counts as unset.
  EXPECT_FALSE(Read({{"AVIARY_THREADS", ""}, {"AVIARY_LOAD", ""}}).threads);
  EXPECT_EQ(Read({}).hub.cache_dir, "./.cache/aviary");
}

TEST(CliEnvironment, ReadsEveryVariable) {
  const Environment env = Read({{"AVIARY_THREADS", "3"},
                                {"AVIARY_KERNELS", "reference"},
                                {"AVIARY_ACTIVATIONS", "f32"},
                                {"AVIARY_LOAD", "read"},
                                {"AVIARY_CACHE_DIR", "/c"},
                                {"XDG_CACHE_HOME", "/x"},
                                {"HOME", "/h"},
                                {"AVIARY_HF_ENDPOINT", "http://mirror.example//"},
                                {"AVIARY_RAW_GITHUB_ENDPOINT", "http://raw.example/"},
                                {"AVIARY_STALL_TIMEOUT", "7"}});
  EXPECT_EQ(env.threads, 3);
  EXPECT_EQ(env.kernels, Kernels::kReference);
  EXPECT_EQ(env.activations, Activations::kF32);
  EXPECT_EQ(env.load_mode, LoadMode::kRead);
  EXPECT_EQ(env.hub.cache_dir, "/c");
  EXPECT_EQ(env.hub.hf_endpoint, "http://mirror.example");
  EXPECT_EQ(env.hub.raw_github_endpoint, "http://raw.example");
  EXPECT_EQ(env.stall_timeout_s, 7);
  EXPECT_EQ(Read({{"XDG_CACHE_HOME", "/x"}, {"HOME", "/h"}}).hub.cache_dir, "/x/aviary");
  EXPECT_EQ(Read({{"AVIARY_KERNELS", "fast"}}).kernels, Kernels::kFast);
  EXPECT_EQ(Read({{"AVIARY_ACTIVATIONS", "int8"}}).activations, Activations::kInt8);
  EXPECT_EQ(Read({{"AVIARY_ACTIVATIONS", "auto"}}).activations, Activations::kAuto);
  EXPECT_EQ(Read({{"AVIARY_LOAD", "mmap"}}).load_mode, LoadMode::kMmap);
  EXPECT_EQ(Read({{"AVIARY_LOAD", "auto"}}).load_mode, LoadMode::kAuto);
  EXPECT_EQ(Read({{"AVIARY_THREADS", "1024"}}).threads, 1024);
}

TEST(CliEnvironment, BadValuesAreRejectedNamingTheVariable) {
  for (const char* bad : {"0", "-1", "1025", "2x", " 2", "two", "99999999999999999999"}) {
    EXPECT_EQ(
        ErrorOf({{"AVIARY_THREADS", bad}}),
        std::string("AVIARY_THREADS is '") + bad + "'; it must be a thread count from 1 to 1024");
  }
  EXPECT_EQ(ErrorOf({{"AVIARY_KERNELS", "Fast"}}),
            "AVIARY_KERNELS is 'Fast'; it must be 'fast' or 'reference'");
  EXPECT_EQ(ErrorOf({{"AVIARY_ACTIVATIONS", "bf16"}}),
            "AVIARY_ACTIVATIONS is 'bf16'; it must be 'auto', 'int8' or 'f32'");
  EXPECT_EQ(ErrorOf({{"AVIARY_LOAD", "bogus"}}),
            "AVIARY_LOAD is 'bogus'; it must be 'auto', 'mmap' or 'read'");
  for (const char* bad : {"0", "soon", "86401", "-5"}) {
    EXPECT_NE(ErrorOf({{"AVIARY_STALL_TIMEOUT", bad}}).find("AVIARY_STALL_TIMEOUT"),
              std::string::npos)
        << bad;
  }
  EXPECT_EQ(ErrorOf({{"AVIARY_THREADS", "4"}, {"AVIARY_LOAD", "read"}}), "");
}

TEST(CliEnvironment, FlagParsersNameTheFlag) {
  EXPECT_EQ(ParseThreads("8", "--threads"), 8);
  EXPECT_THROW(ParseThreads("0", "--threads"), UsageError);
  try {
    ParseKernels("simd", "--kernels");
    FAIL();
  } catch (const UsageError& e) {
    EXPECT_STREQ(e.what(), "--kernels is 'simd'; it must be 'fast' or 'reference'");
  }
}

TEST(CliEnvironment, HelpListsEveryVariable) {
  const std::string help = EnvironmentHelp();
  for (const char* name :
       {"AVIARY_THREADS", "AVIARY_KERNELS", "AVIARY_ACTIVATIONS", "AVIARY_LOAD", "AVIARY_CACHE_DIR",
        "AVIARY_HF_ENDPOINT", "AVIARY_RAW_GITHUB_ENDPOINT", "AVIARY_STALL_TIMEOUT"}) {
    EXPECT_NE(help.find(name), std::string::npos) << name;
  }
}

// mpirun's variables say how many processes it started and which one this is; the bucket size
// is checked like the other numbers.
TEST(CliEnvironment, ReadsTheMpiLaunchersVariables) {
  const Environment none = Read({});
  EXPECT_EQ(none.launcher_size, 0);
  EXPECT_EQ(none.launcher_rank, 0);
  EXPECT_EQ(none.launcher_local_size, 1);
  EXPECT_FALSE(none.mpi_bucket_kib);
  const Environment ompi = Read({{"OMPI_COMM_WORLD_SIZE", "4"},
                                 {"OMPI_COMM_WORLD_RANK", "3"},
                                 {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                                 {"AVIARY_MPI_BUCKET_KIB", "40"}});
  EXPECT_EQ(ompi.launcher_size, 4);
  EXPECT_EQ(ompi.launcher_rank, 3);
  EXPECT_EQ(ompi.launcher_local_size, 2);
  EXPECT_EQ(ompi.mpi_bucket_kib, 40);
  const Environment hydra = Read({{"PMI_SIZE", "2"}, {"PMI_RANK", "1"}});
  EXPECT_EQ(hydra.launcher_size, 2);
  EXPECT_EQ(hydra.launcher_rank, 1);
  EXPECT_EQ(Read({{"PMIX_RANK", "0"}}).launcher_size, 1);
  EXPECT_NE(ErrorOf({{"AVIARY_MPI_BUCKET_KIB", "0"}}).find("AVIARY_MPI_BUCKET_KIB"),
            std::string::npos);
  EXPECT_NE(ErrorOf({{"AVIARY_MPI_BUCKET_KIB", "4M"}}), "");
}

}  // namespace
}  // namespace aviary::cli
