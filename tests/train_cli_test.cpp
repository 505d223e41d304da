// `aviary train` end to end: from scratch and finetuning on real text, the outputs every other
// command runs, the training forward equal to inference, determinism, resuming after a kill,
// the loss plot, PyTorch reading the exported .pth, and bad input.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "aviary/model.h"
#include "test_data.h"
#include "train/export.h"
#include "train/import.h"
#include "train/rwkv7_graph.h"

namespace aviary::testing {
namespace {

namespace fs = std::filesystem;

struct LogLine {
  int64_t step;
  double loss = -1, val_loss = -1;
};

std::vector<LogLine> ReadLog(const std::string& dir) {
  std::vector<LogLine> lines;
  std::ifstream in(dir + "/log.jsonl");
  std::string s;
  while (std::getline(in, s)) {
    const nlohmann::json j = nlohmann::json::parse(s);
    LogLine l{j.at("step").get<int64_t>()};
    if (j.contains("loss")) l.loss = j["loss"].get<double>();
    if (j.contains("val_loss")) l.val_loss = j["val_loss"].get<double>();
    lines.push_back(l);
  }
  return lines;
}

// A small run: 2 layers x 64 on 60 kB of Shakespeare.
std::string SmallRun(const std::string& dir, const std::string& extra) {
  return CliPath() + " train --data " + ShakespearePart(60000) +
         " --layers 2 --embd 64 --ctx-len 32 --batch 4 --lr 3e-3 --warmup 5 --eval-windows 8 "
         "--out " +
         dir + " " + extra + " 2>&1";
}

TEST(TrainCli, FromScratchLearnsAndEveryCommandRunsTheResult) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string dir = ProcessTempDir() + "scratch";
  const CommandResult r = RunCommand(SmallRun(dir, "--steps 40 --eval-every 20 --threads 2"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("RWKV-7, 2 layers x 64"), std::string::npos) << r.output;
  const std::vector<LogLine> log = ReadLog(dir);
  ASSERT_EQ(log.size(), 41u);  // the step-0 validation, then 40 steps
  EXPECT_EQ(log.front().step, 0);
  EXPECT_GT(log.front().val_loss, 5.0);  // ln 256 = 5.55 from the official init
  EXPECT_LT(log.back().val_loss, 3.3);   // bytes of English after 40 small steps
  EXPECT_LT(log.back().loss, log[1].loss - 2.0);
  for (const char* f : {"model.pth", "model.gguf", "checkpoint", "data"}) {
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  }
  // The .pth and the GGUF give the same logits in aviary, and generate runs the result.
  std::string outputs[2];
  for (int i = 0; i < 2; ++i) {
    const std::string model = dir + (i ? "/model.gguf" : "/model.pth");
    const std::string out = dir + "/logits" + std::to_string(i) + ".f32";
    const CommandResult l =
        RunCommand(CliPath() + " logits --activations f32 --model " + model +
                   " --prompt 'ROMEO:' --all-positions --output " + out + " 2>&1");
    ASSERT_EQ(l.exit_code, 0) << l.output;
    const std::vector<uint8_t> bytes = ReadFileBytes(out);
    outputs[i].assign(bytes.begin(), bytes.end());
  }
  EXPECT_EQ(outputs[0].size(), 6u * 256 * 4);
  EXPECT_EQ(outputs[0], outputs[1]);
  const CommandResult g =
      RunCommand(CliPath() + " generate --model " + dir +
                 "/model.gguf --prompt 'KING' --tokens 20 --temperature 0 2>&1");
  EXPECT_EQ(g.exit_code, 0) << g.output;
  // PyTorch reads the .pth, and its independent forward gives aviary's logits.
  std::ofstream(dir + "/prompt.txt") << "ROMEO:";
  const CommandResult torch =
      RunCommand("/usr/bin/python3 -c 'import torch' 2>&1 && /usr/bin/python3 " AVIARY_SOURCE_DIR
                 "/tests/train/check_export.py --pth " +
                 dir + "/model.pth --aviary-logits " + dir + "/logits0.f32 --tokens " + dir +
                 "/prompt.txt --vocab 256 2>&1");
  if (torch.output.find("No module named") != std::string::npos) {
    if (InCI()) FAIL() << "CI needs Debian's python3-torch: " << torch.output;
    GTEST_SKIP() << "no python3-torch: " << torch.output;
  }
  EXPECT_EQ(torch.exit_code, 0) << torch.output;
}

TEST(TrainCli, TheTrainingForwardIsTheInferenceForward) {
  REQUIRE_SHARED("models/tiny-rwkv-7v0-834K-FP32.bin");
  using namespace aviary::train;
  const ImportedRwkv7 m = LoadRwkv7Params(SharedPath("models/tiny-rwkv-7v0-834K-FP32.bin"));
  const std::string pth = ProcessTempDir() + "forward.pth";
  ExportRwkv7Pth(pth, m.layout, m.params.data());
  RuntimeOptions f32;
  f32.activations = Activations::kF32;
  LoadOptions load;
  load.runtime = std::make_shared<Runtime>(f32);
  const std::unique_ptr<Model> model = Model::Load(pth, load);
  const std::vector<int32_t> tokens = {'T', 'o', ' ', 'b', 'e', ',', ' ', 'o', 'r', ' ',
                                       'n', 'o', 't', ' ', 't', 'o', ' ', 'b', 'e', ':'};
  State state = model->NewState();
  std::vector<float> expected;
  model->Eval(tokens, state, &expected, true);

  ScopedRuntime scope(load.runtime.get());
  Rwkv7Graph graph(m.layout, 1, 20);
  std::vector<float> logits(20 * 256);
  graph.Forward(m.params.data(), tokens, tokens, 1, 20, nullptr, nullptr, logits.data());
  ASSERT_EQ(expected.size(), logits.size());
  for (size_t i = 0; i < logits.size(); ++i) ASSERT_EQ(logits[i], expected[i]) << "logit " << i;
}

TEST(TrainCli, SameSeedSameLossesWhateverTheThreads) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  std::vector<std::vector<LogLine>> logs;
  for (const char* threads : {"1", "2", "2"}) {
    const std::string dir = ProcessTempDir() + "seed-" + std::to_string(logs.size());
    const CommandResult r =
        RunCommand(SmallRun(dir, std::string("--steps 6 --eval-every 3 --threads ") + threads));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    logs.push_back(ReadLog(dir));
  }
  for (size_t run = 1; run < logs.size(); ++run) {
    ASSERT_EQ(logs[run].size(), logs[0].size());
    for (size_t i = 0; i < logs[0].size(); ++i) {
      EXPECT_EQ(logs[run][i].loss, logs[0][i].loss) << "run " << run << " line " << i;
      EXPECT_EQ(logs[run][i].val_loss, logs[0][i].val_loss) << "run " << run << " line " << i;
    }
  }
  const std::string other = ProcessTempDir() + "seed-other";
  ASSERT_EQ(RunCommand(SmallRun(other, "--steps 6 --eval-every 3 --seed 7")).exit_code, 0);
  EXPECT_NE(ReadLog(other)[1].loss, logs[0][1].loss);
}

TEST(TrainCli, ResumeAfterAKillMatchesTheUninterruptedRun) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string whole = ProcessTempDir() + "whole", cut = ProcessTempDir() + "cut";
  const std::string args = "--steps 30 --eval-every 10 --save-every 10";
  ASSERT_EQ(RunCommand(SmallRun(whole, args)).exit_code, 0);
  // The same run, killed (SIGKILL) once its first checkpoint is written.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + SmallRun(cut, args) + " > /dev/null").c_str(), nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  bool killed = false;
  while (std::chrono::steady_clock::now() < deadline) {
    const std::vector<LogLine> log =
        fs::exists(cut + "/log.jsonl") ? ReadLog(cut) : std::vector<LogLine>{};
    if (!log.empty() && log.back().step >= 12) {
      kill(pid, SIGKILL);
      killed = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(killed && WIFSIGNALED(status)) << "the run ended before it could be killed";
  const CommandResult r = RunCommand(CliPath() + " train --resume " + cut + " 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("from step 10"), std::string::npos) << r.output;
  const std::vector<LogLine> a = ReadLog(whole), b = ReadLog(cut);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].step, b[i].step);
    EXPECT_EQ(a[i].loss, b[i].loss) << "line " << i;
    EXPECT_EQ(a[i].val_loss, b[i].val_loss) << "line " << i;
  }
  EXPECT_EQ(ReadFileBytes(whole + "/model.pth"), ReadFileBytes(cut + "/model.pth"));
}

TEST(TrainCli, CtrlCSavesTheStepAndResumeMatchesTheUninterruptedRun) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string whole = ProcessTempDir() + "int-whole", cut = ProcessTempDir() + "int-cut";
  const std::string args = "--steps 40 --eval-every 20 --save-every 1000";
  ASSERT_EQ(RunCommand(SmallRun(whole, args)).exit_code, 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + SmallRun(cut, args) + " > /dev/null").c_str(), nullptr);
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  bool sent = false;
  while (std::chrono::steady_clock::now() < deadline) {
    const std::vector<LogLine> log =
        fs::exists(cut + "/log.jsonl") ? ReadLog(cut) : std::vector<LogLine>{};
    if (!log.empty() && log.back().step >= 5) {
      kill(pid, SIGINT);
      sent = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(sent) << "the run ended before it could be interrupted";
  ASSERT_TRUE(WIFEXITED(status)) << "killed instead of stopping";
  EXPECT_EQ(WEXITSTATUS(status), 130);
  EXPECT_FALSE(fs::exists(cut + "/model.pth"));  // the run did not finish
  const int64_t stopped_at = ReadLog(cut).back().step;
  EXPECT_GE(stopped_at, 5);
  EXPECT_LT(stopped_at, 40);
  const CommandResult r = RunCommand(CliPath() + " train --resume " + cut + " 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("from step " + std::to_string(stopped_at)), std::string::npos)
      << r.output;
  const std::vector<LogLine> a = ReadLog(whole), b = ReadLog(cut);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].loss, b[i].loss) << "line " << i;
    EXPECT_EQ(a[i].val_loss, b[i].val_loss) << "line " << i;
  }
  EXPECT_EQ(ReadFileBytes(whole + "/model.pth"), ReadFileBytes(cut + "/model.pth"));
}

TEST(TrainCli, FinetuningATestModelLowersItsValidationLoss) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED("models/tiny-rwkv-7v0-834K-Q5_1.bin");
  const std::string dir = ProcessTempDir() + "finetune";
  const CommandResult r = RunCommand(
      CliPath() + " train --init " + SharedPath("models/tiny-rwkv-7v0-834K-Q5_1.bin") + " --data " +
      ShakespearePart(60000) +
      " --ctx-len 32 --batch 4 --steps 12 --lr 1e-3 --eval-every 6 --eval-windows 8 --out " + dir +
      " 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<LogLine> log = ReadLog(dir);
  ASSERT_FALSE(log.empty());
  EXPECT_LT(log.back().val_loss, log.front().val_loss - 0.1);
}

TEST(TrainCli, PlotDrawsThePng) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string dir = ProcessTempDir() + "plot";
  ASSERT_EQ(RunCommand(SmallRun(dir, "--steps 4 --eval-every 2")).exit_code, 0);
  const CommandResult r =
      RunCommand(CliPath() + " train --plot " + dir + "/log.jsonl -o " + dir + "/loss.png 2>&1");
  if (r.output.find("needs gnuplot") != std::string::npos && !InCI()) {
    GTEST_SKIP() << r.output;
  }
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<uint8_t> png = ReadFileBytes(dir + "/loss.png");
  ASSERT_GT(png.size(), 1000u);
  EXPECT_EQ(std::string(png.begin() + 1, png.begin() + 4), "PNG");
  const CommandResult bad = RunCommand(CliPath() + " train --plot " + ShakespearePart(60000) +
                                       " -o " + dir + "/x.png 2>&1");
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("not a training log line"), std::string::npos) << bad.output;
}

TEST(TrainCli, BadInputIsAOneLineError) {
  const std::string dir = ProcessTempDir() + "bad";
  const std::string empty = ProcessTempDir() + "empty.txt";
  std::ofstream(empty).close();
  struct Case {
    std::string args, message;
    int code;
  };
  const std::vector<Case> cases = {
      {"--data /nonexistent.txt --layers 2 --embd 64 --out " + dir, "/nonexistent.txt", 1},
      {"--data " + empty + " --layers 2 --embd 64 --out " + dir + "-e", "empty", 1},
      {"--data " + empty + " --out " + dir + "-n", "--layers and --embd", 2},
      {"--data " + empty + " --layers 2 --embd 100 --out " + dir + "-w", "multiple of the head", 1},
      {"--data " + empty + " --layers 2 --embd 64 --batch 0 --out " + dir + "-b", "--batch", 2},
      {"--data " + empty + " --layers 2 --embd 64 --steps 0 --out " + dir + "-s", "--steps", 2},
      {"--data " + empty + " --layers 2 --embd 64 --lr -1 --out " + dir + "-l", "--lr", 2},
      {"--data " + empty + " --init " + SharedPath("models/tiny-rwkv-5v2-730K-FP32.bin") +
           " --out " + dir + "-v",
       "RWKV-7", 1},
      {"--resume " + ProcessTempDir() + "no-such-run", "checkpoint", 1},
      {"--data " + empty + " --layers 1024 --embd 16384 --out " + dir + "-m",
       "more than this machine", 1},
      {"--data " + empty + " --layers 1 --embd 64 --batch 65536 --ctx-len 256 --out " + dir + "-a",
       "lower --batch or --ctx-len", 1},
      {"--data " + empty + " --layers 2 --embd 64 --ctx-len 32 --chunk-len 64 --out " + dir + "-c",
       "--chunk-len", 2},
      {"--data " + empty + " --layers 2 --embd 64 --grad-chunks -1 --out " + dir + "-g",
       "--grad-chunks", 2},
  };
  for (const Case& c : cases) {
    const CommandResult r = RunCommand(CliPath() + " train " + c.args + " 2>&1");
    EXPECT_EQ(r.exit_code, c.code) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_LE(std::count(r.output.begin(), r.output.end(), '\n'), 1) << c.args << "\n" << r.output;
  }
}

// Longer context: the same run with each window cut into 4 chunks (the state carried forward,
// its gradient back) follows the one-pass run; only float summation order differs, and the
// activations it keeps shrink with the chunk.
TEST(TrainCli, ChunkedWindowsFollowTheOnePassRun) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string whole = ProcessTempDir() + "one-pass", chunked = ProcessTempDir() + "chunked";
  const CommandResult a = RunCommand(SmallRun(whole, "--steps 6 --eval-every 3 --threads 2"));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  const CommandResult b =
      RunCommand(SmallRun(chunked, "--steps 6 --eval-every 3 --threads 2 --chunk-len 8"));
  ASSERT_EQ(b.exit_code, 0) << b.output;
  const std::vector<LogLine> la = ReadLog(whole), lb = ReadLog(chunked);
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_NEAR(la[i].loss, lb[i].loss, 1e-4 * std::fabs(la[i].loss)) << "step " << la[i].step;
    EXPECT_NEAR(la[i].val_loss, lb[i].val_loss, 1e-4 * std::fabs(la[i].val_loss))
        << "step " << la[i].step;
  }
  auto activations = [](const std::string& out) {
    const size_t at = out.find("activations ");
    return at == std::string::npos ? -1.0 : std::stod(out.substr(at + 12));
  };
  EXPECT_LT(activations(b.output), 0.5 * activations(a.output)) << a.output << b.output;
}

TEST(TrainCli, AFinishedRunIsNeverOverwritten) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string dir = ProcessTempDir() + "keep";
  ASSERT_EQ(RunCommand(SmallRun(dir, "--steps 2 --eval-every 0")).exit_code, 0);
  const std::vector<uint8_t> before = ReadFileBytes(dir + "/model.pth");
  const CommandResult again = RunCommand(SmallRun(dir, "--steps 2"));
  EXPECT_EQ(again.exit_code, 2) << again.output;
  EXPECT_NE(again.output.find("already holds a training run"), std::string::npos) << again.output;
  const CommandResult other = RunCommand(CliPath() + " train --resume " + dir + " --batch 8 2>&1");
  EXPECT_EQ(other.exit_code, 2) << other.output;
  EXPECT_NE(other.output.find("--batch cannot be given"), std::string::npos) << other.output;
  // Resuming on other data is refused: the windows would not be the run's.
  const std::string data = ShakespearePart(60000);
  const std::vector<uint8_t> text = ReadFileBytes(data);
  std::ofstream(data, std::ios::app) << "More text than the run had.";
  const CommandResult changed =
      RunCommand(CliPath() + " train --resume " + dir + " --steps 4 2>&1");
  EXPECT_EQ(changed.exit_code, 1) << changed.output;
  EXPECT_NE(changed.output.find("training data changed"), std::string::npos) << changed.output;
  std::ofstream(data, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(text.data()), text.size());
  // A damaged checkpoint is refused and left as it is.
  std::string params;
  for (const auto& e : fs::directory_iterator(dir + "/checkpoint")) {
    if (e.path().filename().string().starts_with("params")) params = e.path().string();
  }
  ASSERT_FALSE(params.empty());
  {
    std::fstream f(params, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1000);
    f.put('\x7f');
  }
  const CommandResult damaged =
      RunCommand(CliPath() + " train --resume " + dir + " --steps 4 2>&1");
  EXPECT_EQ(damaged.exit_code, 1) << damaged.output;
  EXPECT_EQ(ReadFileBytes(dir + "/model.pth"), before);
}

}  // namespace
}  // namespace aviary::testing
