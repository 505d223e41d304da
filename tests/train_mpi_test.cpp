// `aviary train` as two processes under mpirun: the same losses as one process with the same
// global batch (up to the order of float sums), the ranks' weights bit-identical, a run killed
// and resumed equal to the uninterrupted one, a checkpoint continued with another number of
// processes, and errors that end the whole job. Without MPI in the build the tests skip, except
// in CI (CI=true), where they fail.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "test_data.h"

namespace aviary::testing {
namespace {

namespace fs = std::filesystem;

#define REQUIRE_MPI()                                                                         \
  do {                                                                                        \
    if (std::string(AVIARY_MPIEXEC).empty()) {                                                \
      if (InCI()) FAIL() << "CI builds with MPI: install openmpi-bin and libopenmpi-dev";     \
      GTEST_SKIP() << "built without MPI (apt install openmpi-bin libopenmpi-dev, re-cmake)"; \
    }                                                                                         \
    REQUIRE_SHARED("data/tinyshakespeare.txt");                                               \
  } while (0)

// Float sums in another order (two partial sums added instead of one running sum) change a
// step's gradient in its last bits; over a few Adam steps that reaches the loss's 6th digit.
constexpr double kLossTolerance = 1e-5;

// mpirun as CI runs it: as root, more processes than cores allowed, shared memory between the
// ranks without the kernel's cross-memory attach (not allowed in containers). Under ASan the
// ranks run without LeakSanitizer: OpenMPI keeps allocations until exit in components it
// loads with dlopen and unloads in MPI_Finalize, so the reports name no module a suppression
// could match. (Every single-process run here, and in the other tests, keeps it.)
std::string Mpirun(int np) {
  return "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
         "ASAN_OPTIONS=\"${ASAN_OPTIONS}:detect_leaks=0\" " +
         std::string(AVIARY_MPIEXEC) + " -np " + std::to_string(np) +
         " --oversubscribe --bind-to none --mca btl self,vader"
         " --mca btl_vader_single_copy_mechanism none ";
}

// A small run (2 layers x 64 on 60 kB of Shakespeare, 1 thread a process), as `np` processes
// (0: no mpirun at all).
std::string TrainRun(int np, const std::string& dir, const std::string& extra) {
  return (np > 0 ? Mpirun(np) : std::string()) + CliPath() + " train --data " +
         ShakespearePart(60000) +
         " --layers 2 --embd 64 --ctx-len 32 --lr 3e-3 --warmup 3 --eval-windows 16 --threads 1 "
         "--out " +
         dir + " " + extra + " 2>&1";
}
std::string Resume(int np, const std::string& dir, const std::string& extra = "") {
  return (np > 0 ? Mpirun(np) : std::string()) + CliPath() + " train --threads 1 --resume " +
         dir + " " + extra + " 2>&1";
}

std::vector<nlohmann::json> ReadLog(const std::string& dir) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(dir + "/log.jsonl");
  std::string s;
  while (std::getline(in, s)) lines.push_back(nlohmann::json::parse(s));
  return lines;
}

// Every step's training and validation loss of two runs within `tolerance` (0: equal).
void ExpectSameLosses(const std::vector<nlohmann::json>& a, const std::vector<nlohmann::json>& b,
                      double tolerance) {
  ASSERT_EQ(a.size(), b.size());
  ASSERT_GT(a.size(), 2u);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i]["step"], b[i]["step"]);
    for (const char* key : {"loss", "val_loss"}) {
      ASSERT_EQ(a[i].contains(key), b[i].contains(key)) << key << " line " << i;
      if (!a[i].contains(key)) continue;
      const double x = a[i][key].get<double>(), y = b[i][key].get<double>();
      if (tolerance == 0) {
        EXPECT_EQ(x, y) << key << " line " << i;
      } else {
        EXPECT_NEAR(x, y, tolerance) << key << " line " << i;
      }
    }
  }
}

// The checksums of each rank's weights a line logs: present, one per rank, all equal.
void ExpectRanksAgree(const nlohmann::json& line, int np) {
  ASSERT_TRUE(line.contains("weights_checksums")) << line.dump();
  const auto& sums = line["weights_checksums"];
  ASSERT_EQ(sums.size(), static_cast<size_t>(np)) << line.dump();
  for (const auto& s : sums) EXPECT_EQ(s, sums[0]) << line.dump();
}

TEST(TrainMpi, TwoProcessesFollowOneWithTheSameGlobalBatch) {
  REQUIRE_MPI();
  // Batch 4: 2 windows a process; batch 3: 2 and 1 (the shares differ by at most one).
  for (int batch : {4, 3}) {
    const std::string one = ProcessTempDir() + "one-" + std::to_string(batch);
    const std::string two = ProcessTempDir() + "two-" + std::to_string(batch);
    const std::string args =
        "--batch " + std::to_string(batch) + " --steps 8 --eval-every 4 --save-every 4";
    const CommandResult a = RunCommand(TrainRun(0, one, args));
    ASSERT_EQ(a.exit_code, 0) << a.output;
    const CommandResult b = RunCommand(TrainRun(2, two, args));
    ASSERT_EQ(b.exit_code, 0) << b.output;
    // Rank 0 alone prints the progress.
    EXPECT_NE(b.output.find("data parallel: 2 processes"), std::string::npos) << b.output;
    size_t count = 0;
    for (size_t at = 0; (at = b.output.find("step 8/8", at)) != std::string::npos; ++at) ++count;
    EXPECT_EQ(count, 1u) << b.output;
    const auto la = ReadLog(one), lb = ReadLog(two);
    ExpectSameLosses(la, lb, kLossTolerance);
    EXPECT_NE(la.back()["loss"], lb.back()["loss"]) << "suspiciously equal: one process twice?";
    EXPECT_EQ(lb.back()["ranks"], 2);
    EXPECT_GE(lb.back()["comm_s"].get<double>(), 0.0);
    ExpectRanksAgree(lb[4], 2);  // the checkpoint at step 4
    ExpectRanksAgree(lb.back(), 2);
    EXPECT_TRUE(fs::exists(two + "/model.pth") && fs::exists(two + "/model.gguf"));
    if (batch != 4) continue;
    // Small buckets (17 for these 170 K floats, most sent while the backward pass still runs)
    // give the same sums: two ranks' sums do not depend on how the buffer is cut.
    const std::string small = ProcessTempDir() + "two-small-buckets";
    const CommandResult c = RunCommand("AVIARY_MPI_BUCKET_KIB=40 " + TrainRun(2, small, args));
    ASSERT_EQ(c.exit_code, 0) << c.output;
    ExpectSameLosses(lb, ReadLog(small), 0);
    EXPECT_EQ(ReadFileBytes(two + "/model.pth"), ReadFileBytes(small + "/model.pth"));
  }
}

// LoRA adapters and a tuned state on a frozen base: their gradients are summed the same way.
TEST(TrainMpi, LoraAndStateTuningFollowOneProcess) {
  REQUIRE_MPI();
  REQUIRE_SHARED("models/stress/stress-rwkv-7v0-FP32.bin");
  for (const std::string tune : {"--tune lora --lora-rank 8 --lr 1e-3", "--tune state --lr 0.1"}) {
    const std::string name = tune.substr(7, 4);
    const std::string one = ProcessTempDir() + "tune-one-" + name;
    const std::string two = ProcessTempDir() + "tune-two-" + name;
    const std::string args = "--init " + SharedPath("models/stress/stress-rwkv-7v0-FP32.bin") +
                             " --data " + ShakespearePart(60000) +
                             " --ctx-len 32 --batch 4 --steps 8 --eval-every 4 --eval-windows 8"
                             " --threads 1 " +
                             tune;
    auto run = [&](int np, const std::string& dir) {
      return (np > 0 ? Mpirun(np) : std::string()) + CliPath() + " train " + args + " --out " +
             dir + " 2>&1";
    };
    const CommandResult a = RunCommand(run(0, one));
    ASSERT_EQ(a.exit_code, 0) << a.output;
    const CommandResult b = RunCommand(run(2, two));
    ASSERT_EQ(b.exit_code, 0) << b.output;
    const auto lb = ReadLog(two);
    ExpectSameLosses(ReadLog(one), lb, kLossTolerance);
    ExpectRanksAgree(lb.back(), 2);
  }
}

TEST(TrainMpi, KilledAndResumedAtTwoMatchesTheUninterruptedRun) {
  REQUIRE_MPI();
  const std::string whole = ProcessTempDir() + "whole", cut = ProcessTempDir() + "cut";
  const std::string args = "--batch 4 --steps 16 --eval-every 8 --save-every 4";
  const CommandResult w = RunCommand(TrainRun(2, whole, args));
  ASSERT_EQ(w.exit_code, 0) << w.output;
  // The same run; one rank killed (SIGKILL) after the first checkpoint: mpirun ends the rest.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    setpgid(0, 0);
    execl("/bin/sh", "sh", "-c", ("exec > /dev/null; exec " + TrainRun(2, cut, args)).c_str(),
          nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(3);
  bool killed = false;
  while (std::chrono::steady_clock::now() < deadline && !killed) {
    const auto log = fs::exists(cut + "/log.jsonl") ? ReadLog(cut) : std::vector<nlohmann::json>{};
    if (!log.empty() && log.back()["step"].get<int64_t>() >= 5) {
      // mpirun's children are the ranks: kill one of them.
      const CommandResult ranks = RunCommand("pgrep -P " + std::to_string(pid));
      const pid_t rank = static_cast<pid_t>(std::atoi(ranks.output.c_str()));
      if (rank > 0) killed = kill(rank, SIGKILL) == 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(killed) << "the run ended before it could be killed";
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "mpirun said the job succeeded";
  EXPECT_FALSE(fs::exists(cut + "/model.pth"));
  const CommandResult r = RunCommand(Resume(2, cut));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(r.output.find("from step 4") != std::string::npos ||
              r.output.find("from step 8") != std::string::npos)
      << r.output;
  // Same sums in the same order on the same number of ranks: bit for bit.
  ExpectSameLosses(ReadLog(whole), ReadLog(cut), 0);
  EXPECT_EQ(ReadFileBytes(whole + "/model.pth"), ReadFileBytes(cut + "/model.pth"));
}

TEST(TrainMpi, ACheckpointContinuesWithAnotherNumberOfProcesses) {
  REQUIRE_MPI();
  // Runs of 4 steps continued to 8 (--steps 8 on resume: the same schedule change in all
  // three): one process then one, one then two, two then one.
  const std::string args = "--batch 4 --eval-every 4 --steps 4";
  std::vector<nlohmann::json> logs[3];
  const int first[3] = {0, 0, 2}, then[3] = {0, 2, 0};
  for (int i = 0; i < 3; ++i) {
    const std::string dir = ProcessTempDir() + "np" + std::to_string(first[i]) + "-to-" +
                            std::to_string(then[i]);
    const CommandResult a = RunCommand(TrainRun(first[i], dir, args));
    ASSERT_EQ(a.exit_code, 0) << a.output;
    const CommandResult b = RunCommand(Resume(then[i], dir, "--steps 8"));
    ASSERT_EQ(b.exit_code, 0) << b.output;
    EXPECT_NE(b.output.find("from step 4"), std::string::npos) << b.output;
    logs[i] = ReadLog(dir);
  }
  ExpectSameLosses(logs[0], logs[1], kLossTolerance);
  ExpectSameLosses(logs[0], logs[2], kLossTolerance);
  EXPECT_EQ(logs[1].back()["ranks"], 2);      // the continuation ran as two processes
  EXPECT_FALSE(logs[2].back().contains("ranks"));  // and this one as one
  EXPECT_EQ(logs[2][4]["ranks"], 2);
}

TEST(TrainMpi, SigtermToOneRankStopsEveryRankAtTheSameStep) {
  REQUIRE_MPI();
  const std::string whole = ProcessTempDir() + "term-whole", cut = ProcessTempDir() + "term-cut";
  const std::string args = "--batch 4 --steps 30 --eval-every 15 --save-every 1000";
  ASSERT_EQ(RunCommand(TrainRun(2, whole, args)).exit_code, 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec > /dev/null; exec " + TrainRun(2, cut, args)).c_str(),
          nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(3);
  bool sent = false;
  while (std::chrono::steady_clock::now() < deadline && !sent) {
    const auto log = fs::exists(cut + "/log.jsonl") ? ReadLog(cut) : std::vector<nlohmann::json>{};
    if (!log.empty() && log.back()["step"].get<int64_t>() >= 3) {
      // The signal goes to one rank only (the last of mpirun's children).
      const CommandResult ranks = RunCommand("pgrep -P " + std::to_string(pid) + " | tail -1");
      const pid_t rank = static_cast<pid_t>(std::atoi(ranks.output.c_str()));
      if (rank > 0) sent = kill(rank, SIGTERM) == 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(sent) << "the run ended before it could be stopped";
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130);
  EXPECT_FALSE(fs::exists(cut + "/model.pth"));
  const auto stopped = ReadLog(cut);
  const int64_t at = stopped.back()["step"].get<int64_t>();
  EXPECT_LT(at, 30);
  ExpectRanksAgree(stopped.back(), 2);  // checked and saved where both stopped
  const CommandResult r = RunCommand(Resume(2, cut));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("from step " + std::to_string(at)), std::string::npos) << r.output;
  ExpectSameLosses(ReadLog(whole), ReadLog(cut), 0);
}

TEST(TrainMpi, AnErrorEndsTheJobOnceWithItsStatus) {
  REQUIRE_MPI();
  const std::string dir = ProcessTempDir() + "too-few";
  const CommandResult r = RunCommand(TrainRun(2, dir, "--batch 1 --steps 2"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const std::string message = "--batch 1 is smaller than the 2 processes";
  const size_t at = r.output.find(message);
  ASSERT_NE(at, std::string::npos) << r.output;
  EXPECT_EQ(r.output.find(message, at + 1), std::string::npos) << "said twice:\n" << r.output;
  EXPECT_FALSE(fs::exists(dir + "/log.jsonl"));
}

}  // namespace
}  // namespace aviary::testing
