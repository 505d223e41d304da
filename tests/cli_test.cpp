// The aviary command as a user runs it: outputs, files written, exit codes.
#include <sys/resource.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "aviary/model.h"
#include "test_data.h"

namespace aviary::testing {
namespace {

const char* kStress7 = "models/stress/stress-rwkv-7v0-FP32.bin";
const char* kTiny52 = "models/tiny-rwkv-5v2-730K-FP32.bin";

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string Cli(const std::string& args) { return Quote(CliPath()) + " " + args; }

std::string TempFile(const std::string& name) { return ProcessTempDir() + "aviary_cli_" + name; }

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

double NumberAfter(const std::string& text, const std::string& label) {
  std::smatch m;
  const std::regex re(label + R"(\s*([-0-9.eE+]+))");
  if (!std::regex_search(text, m, re)) return NAN;
  return std::stod(m[1]);
}

// Exit status and peak resident memory (KiB) of a shell command and everything it starts: run
// from a forked child, whose RUSAGE_CHILDREN then covers this command alone.
std::pair<int, long> ExitAndPeakRssKiB(const std::string& command) {
  const std::string result = TempFile("rss.txt");
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int status = std::system(command.c_str());
    struct rusage usage {};
    ::getrusage(RUSAGE_CHILDREN, &usage);
    if (FILE* f = std::fopen(result.c_str(), "w")) {
      std::fprintf(f, "%d %ld\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1, usage.ru_maxrss);
      std::fclose(f);
    }
    ::_exit(0);
  }
  int ignored = 0;
  ::waitpid(pid, &ignored, 0);
  int code = -1;
  long kib = 0;
  if (FILE* f = std::fopen(result.c_str(), "r")) {
    if (std::fscanf(f, "%d %ld", &code, &kib) != 2) code = -1;
    std::fclose(f);
  }
  return {code, kib};
}

TEST(Cli, HelpAndVersion) {
  for (const char* args : {"--help", "info --help", "logits --help", "generate --help",
                           "perplexity --help", "--version"}) {
    const CommandResult r = RunCommand(Cli(args) + " 2>&1");
    EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.output;
    EXPECT_NE(r.output.find("aviary"), std::string::npos) << args;
  }
}

// Every command that runs a model takes the runtime flags, and every --help lists the
// environment variables.
TEST(Cli, RuntimeFlagsOnEveryCommandThatRunsAModel) {
  for (const char* command : {"generate", "chat", "logits", "perplexity", "bench"}) {
    const CommandResult r = RunCommand(Cli(std::string(command) + " --help") + " 2>&1");
    EXPECT_EQ(r.exit_code, 0) << command << "\n" << r.output;
    for (const char* flag : {"--threads", "--kernels", "--activations", "--load", "AVIARY_THREADS",
                             "AVIARY_LOAD", "AVIARY_CACHE_DIR"}) {
      EXPECT_NE(r.output.find(flag), std::string::npos) << command << " " << flag;
    }
  }
  const std::pair<const char*, const char*> bad_flags[] = {
      {"logits --output o --threads 0", "--threads"},
      {"logits --output o --threads 1025", "--threads"},
      {"generate --kernels simd", "--kernels"},
      {"perplexity --activations bf16", "--activations"},
      {"chat --load never", "--load"}};
  for (const auto& [args, flag] : bad_flags) {
    const CommandResult r = RunCommand(Cli(std::string(args) + " --model x --prompt a") + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(flag), std::string::npos) << args << "\n" << r.output;
  }
  const CommandResult bad =
      RunCommand("AVIARY_THREADS=lots " + Cli("generate --model x --prompt a") + " 2>&1");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("AVIARY_THREADS is 'lots'"), std::string::npos) << bad.output;
}

// bench --batch reports one aggregate speed per batch size (JSON and text); a size of 0 or
// --gen-tokens 0 (no steps to time) is a usage error.
TEST(Cli, BenchBatchReportsEachSize) {
  REQUIRE_SHARED(kStress7);
  const std::string model = Quote(SharedPath(kStress7));
  const std::string base = "bench --model " + model + " --prompt-tokens 4 --repeat 1 ";
  const CommandResult j = RunCommand(Cli(base + "--gen-tokens 2 --batch 1,3 --json"));
  ASSERT_EQ(j.exit_code, 0) << j.output;
  EXPECT_NE(j.output.find("\"batch\": [{\"sequences\": 1, \"tok_s\": "), std::string::npos)
      << j.output;
  EXPECT_NE(j.output.find("{\"sequences\": 3, \"tok_s\": "), std::string::npos) << j.output;
  const CommandResult t = RunCommand(Cli(base + "--gen-tokens 2 --batch 2"));
  ASSERT_EQ(t.exit_code, 0) << t.output;
  EXPECT_NE(t.output.find("N = 2 "), std::string::npos) << t.output;
  EXPECT_EQ(RunCommand(Cli(base + "--gen-tokens 2 --batch 0") + " 2>&1").exit_code, 2);
  EXPECT_EQ(RunCommand(Cli(base + "--gen-tokens 0 --batch 2") + " 2>&1").exit_code, 2);
}

// --threads, --kernels and --activations win over the variables, and the results follow the
// options: the thread count changes no logit; f32 and reference agree within float rounding.
TEST(Cli, RuntimeFlagsWinOverTheEnvironment) {
  REQUIRE_SHARED(kStress7);
  const std::string model = Quote(SharedPath(kStress7));
  const CommandResult b = RunCommand("AVIARY_THREADS=1 AVIARY_KERNELS=fast " +
                                     Cli("bench --model " + model +
                                         " --threads 2 --kernels reference "
                                         "--prompt-tokens 4 --gen-tokens 1 --repeat 1 --json"));
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("\"threads\": 2,"), std::string::npos) << b.output;
  EXPECT_NE(b.output.find("\"kernels\": \"reference\""), std::string::npos) << b.output;
  EXPECT_NE(b.output.find("\"target\": \"scalar\""), std::string::npos) << b.output;
  const CommandResult e = RunCommand(
      "AVIARY_THREADS=1 AVIARY_KERNELS=reference " +
      Cli("bench --model " + model + " --prompt-tokens 4 --gen-tokens 1 --repeat 1 --json"));
  ASSERT_EQ(e.exit_code, 0) << e.output;
  EXPECT_NE(e.output.find("\"threads\": 1,"), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("\"kernels\": \"reference\""), std::string::npos) << e.output;
  std::vector<std::vector<float>> logits;
  for (const char* flags : {"--threads 1", "--threads 3", "AVIARY_THREADS=3 --threads 2"}) {
    std::string env, args = flags;
    if (args.rfind("AVIARY_", 0) == 0) {
      env = args.substr(0, args.find(' ')) + " ";
      args = args.substr(args.find(' ') + 1);
    }
    const std::string out = TempFile("threads.f32");
    const CommandResult r = RunCommand(
        env + Cli("logits --model " + model + " --prompt 'threads' " + args + " --output " + out) +
        " 2>&1");
    ASSERT_EQ(r.exit_code, 0) << flags << "\n" << r.output;
    logits.push_back(ReadFloats(out));
  }
  EXPECT_EQ(logits[0], logits[1]);
  EXPECT_EQ(logits[0], logits[2]);
}

TEST(Cli, UsageErrorsExitTwoWithOneLine) {
  for (const char* args : {"", "frobnicate", "info", "logits --model x", "generate --model",
                           "info --model a --bogus"}) {
    const CommandResult r = RunCommand(Cli(args) + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("aviary: ", 0), 0u) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
}

TEST(Cli, InfoDescribesTheModel) {
  REQUIRE_SHARED(kStress7);
  const CommandResult r = RunCommand(Cli("info --model " + Quote(SharedPath(kStress7))));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("RWKV v7.0"), std::string::npos) << r.output;
  EXPECT_EQ(NumberAfter(r.output, "layers:"), 3);
  EXPECT_EQ(NumberAfter(r.output, "embedding:"), 128);
  EXPECT_EQ(NumberAfter(r.output, "vocab:"), 256);
  EXPECT_NE(r.output.find("heads:        2 x 64"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("F32"), std::string::npos);
  EXPECT_GT(NumberAfter(r.output, "parameters:"), 100000);
  EXPECT_EQ(NumberAfter(r.output, "file size:"),
            static_cast<double>(ReadFileBytes(SharedPath(kStress7)).size()));
}

TEST(Cli, BadModelFileExitsOne) {
  const std::string empty = TempFile("empty.bin");
  WriteFile(empty, "");
  const std::string junk = TempFile("junk.bin");
  WriteFile(junk, "this is not a model file at all");
  for (const std::string& path : {empty, junk, ::testing::TempDir(), TempFile("missing.bin")}) {
    const CommandResult r = RunCommand(Cli("info --model " + Quote(path)) + " 2>&1");
    EXPECT_EQ(r.exit_code, 1) << path << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("aviary: ", 0), 0u) << r.output;
    EXPECT_NE(r.output.find(path), std::string::npos) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
}

TEST(Cli, LogitsMatchExpectedAndLibrary) {
  REQUIRE_SHARED(kStress7);
  const std::string out = TempFile("last.f32");
  const CommandResult r = RunCommand(
      Cli("logits --model " + Quote(SharedPath(kStress7)) + " --prompt '\"in' --output " + out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<float> got = ReadFloats(out);
  const std::vector<float> want =
      ReadFloats(SharedPath("models/stress/expected-logits-stress-rwkv-7v0-FP32.bin"));
  ASSERT_EQ(got.size(), 256u);
  ASSERT_EQ(want.size(), 256u);
  for (size_t i = 0; i < 256; ++i) EXPECT_NEAR(got[i], want[i], 1e-4) << i;
}

// AVIARY_LOAD: read (anonymous huge-page memory) and mmap give the same logits, bit for bit;
// bench reports the mode, and so does --load, which wins over the variable; an unknown value is
// a usage error naming the variable.
TEST(Cli, LoadModesGiveTheSameLogits) {
  REQUIRE_SHARED(kStress7);
  const std::string model = Quote(SharedPath(kStress7));
  std::vector<std::vector<float>> logits;
  for (const char* mode : {"mmap", "read"}) {
    const std::string out = TempFile(std::string("load-") + mode + ".f32");
    const CommandResult r =
        RunCommand(std::string("AVIARY_LOAD=") + mode + " " +
                   Cli("logits --model " + model + " --prompt 'load' --output " + out) + " 2>&1");
    ASSERT_EQ(r.exit_code, 0) << mode << "\n" << r.output;
    logits.push_back(ReadFloats(out));
    ASSERT_EQ(logits.back().size(), 256u);
    const CommandResult b = RunCommand(
        std::string("AVIARY_LOAD=") + mode + " " +
        Cli("bench --model " + model + " --prompt-tokens 4 --gen-tokens 2 --repeat 1 --json"));
    ASSERT_EQ(b.exit_code, 0) << b.output;
    EXPECT_NE(b.output.find(std::string("\"load_mode\": \"") + mode + "\""), std::string::npos)
        << b.output;
  }
  EXPECT_EQ(std::memcmp(logits[0].data(), logits[1].data(), 256 * sizeof(float)), 0);
  const CommandResult flag = RunCommand(
      "AVIARY_LOAD=mmap " + Cli("bench --model " + model +
                                " --load read --prompt-tokens 4 --gen-tokens 2 --repeat 1 --json"));
  ASSERT_EQ(flag.exit_code, 0) << flag.output;
  EXPECT_NE(flag.output.find("\"load_mode\": \"read\""), std::string::npos) << flag.output;
  const CommandResult bogus = RunCommand(
      "AVIARY_LOAD=bogus " +
      Cli("bench --model " + model + " --prompt-tokens 4 --gen-tokens 2 --repeat 1 --json") +
      " 2>&1");
  EXPECT_EQ(bogus.exit_code, 2) << bogus.output;
  EXPECT_NE(bogus.output.find("AVIARY_LOAD is 'bogus'; it must be 'auto', 'mmap' or 'read'"),
            std::string::npos)
      << bogus.output;
}

// convert and quantize read each tensor once, so they map the input and the result they check
// whatever AVIARY_LOAD says: with AVIARY_LOAD=read forced, converting a 144 MiB model must not
// hold a second copy of it in anonymous memory (mapped pages of the input do count in the RSS).
TEST(Cli, ConvertStreamsWhateverTheLoadMode) {
  const std::string bin = TempFile("stream.bin"), gguf = TempFile("stream.gguf");
  const CommandResult synth = RunCommand(
      Cli("synth --layers 6 --embd 1024 --vocab 256 --type f16 -o " + Quote(bin)) + " 2>&1");
  ASSERT_EQ(synth.exit_code, 0) << synth.output;
  const long file_kib = static_cast<long>(std::filesystem::file_size(bin) / 1024);
  ASSERT_GT(file_kib, 128 * 1024);
  const auto [code, peak_kib] = ExitAndPeakRssKiB(
      "AVIARY_LOAD=read " + Cli("convert " + Quote(bin) + " " + Quote(gguf)) + " > /dev/null");
  EXPECT_EQ(code, 0);
  // The mapped input, plus the program and a few rows in flight; reading the input or the
  // output into memory adds a whole file size.
  EXPECT_LT(peak_kib, file_kib + file_kib / 2)
      << "peak " << peak_kib << " KiB for a " << file_kib << " KiB model";
  std::filesystem::remove(bin);
  std::filesystem::remove(gguf);
}

TEST(Cli, AllPositionsAndOneByOneAgree) {
  REQUIRE_SHARED(kTiny52);
  const std::string prompt_file = TempFile("prompt.txt");
  WriteFile(prompt_file,
            "Tabs\tand\nnewlines, UTF-8: h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x90\xa6 "
            "\x01\xff");
  const size_t n_tokens = ReadFileBytes(prompt_file).size();
  const std::string model = Quote(SharedPath(kTiny52));
  const std::string seq = TempFile("seq.f32"), one = TempFile("one.f32"), last = TempFile("l.f32");
  ASSERT_EQ(RunCommand(Cli("logits --model " + model + " --prompt-file " + prompt_file +
                           " --all-positions --output " + seq))
                .exit_code,
            0);
  ASSERT_EQ(RunCommand(Cli("logits --model " + model + " --prompt-file " + prompt_file +
                           " --all-positions --one-by-one --output " + one))
                .exit_code,
            0);
  ASSERT_EQ(RunCommand(Cli("logits --model " + model + " --prompt-file " + prompt_file +
                           " --output " + last))
                .exit_code,
            0);
  const std::vector<float> a = ReadFloats(seq), b = ReadFloats(one), l = ReadFloats(last);
  ASSERT_EQ(a.size(), n_tokens * 256);
  ASSERT_EQ(b.size(), a.size());
  ASSERT_EQ(l.size(), 256u);
  float max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) max_diff = std::max(max_diff, std::fabs(a[i] - b[i]));
  EXPECT_LE(max_diff, 1e-4);
  for (size_t i = 0; i < 256; ++i) EXPECT_EQ(l[i], a[a.size() - 256 + i]);
}

// perplexity's loss equals the loss computed by hand from `logits --all-positions`.
TEST(Cli, PerplexityConsistentWithLogits) {
  REQUIRE_SHARED(kTiny52);
  const std::string text = "First Citizen:\nBefore we proceed any further, hear me speak.\n";
  const std::string text_file = TempFile("text.txt");
  WriteFile(text_file, text);
  const std::string model = Quote(SharedPath(kTiny52));
  const CommandResult p = RunCommand(Cli("perplexity --model " + model + " --text " + text_file));
  ASSERT_EQ(p.exit_code, 0) << p.output;
  EXPECT_EQ(NumberAfter(p.output, "tokens:"), text.size());
  EXPECT_EQ(NumberAfter(p.output, "predicted:"), text.size() - 1);
  const std::string rows = TempFile("rows.f32");
  ASSERT_EQ(RunCommand(Cli("logits --model " + model + " --prompt-file " + text_file +
                           " --all-positions --output " + rows))
                .exit_code,
            0);
  const std::vector<float> logits = ReadFloats(rows);
  ASSERT_EQ(logits.size(), text.size() * 256);
  double total = 0;
  for (size_t t = 0; t + 1 < text.size(); ++t) {
    const float* row = logits.data() + t * 256;
    double sum = 0;
    for (int v = 0; v < 256; ++v) sum += std::exp(static_cast<double>(row[v]));
    total += std::log(sum) - row[static_cast<unsigned char>(text[t + 1])];
  }
  const double loss = total / (text.size() - 1);
  EXPECT_NEAR(NumberAfter(p.output, "average loss:"), loss, 1e-5);
  EXPECT_NEAR(NumberAfter(p.output, "perplexity:"), std::exp(loss), 1e-3 * std::exp(loss));
  EXPECT_LT(loss, std::log(256.0));  // a trained model beats uniform guessing
}

// perplexity --window: each window scored from the initial state; every position's mean loss
// in --positions-out equals the one computed by hand from `logits` of each window alone.
TEST(Cli, PerplexityByPositionScoresEachWindowFromTheStart) {
  REQUIRE_SHARED(kTiny52);
  const std::string text = "First Citizen:\nBefore we proceed any further, hear me speak.\n";
  const std::string text_file = TempFile("windows.txt");
  WriteFile(text_file, text);
  const std::string model = Quote(SharedPath(kTiny52));
  const std::string tsv = TempFile("positions.tsv");
  constexpr size_t W = 16;
  const CommandResult p = RunCommand(Cli("perplexity --model " + model + " --text " + text_file +
                                         " --window 16 --bucket 4 --positions-out " + tsv));
  ASSERT_EQ(p.exit_code, 0) << p.output;
  const size_t windows = (text.size() - 1) / W;
  ASSERT_EQ(windows, 3u);
  EXPECT_NE(p.output.find("windows:      3 of 16"), std::string::npos) << p.output;
  EXPECT_NE(p.output.find("12-15"), std::string::npos) << p.output;
  std::vector<double> expected(W, 0.0);
  for (size_t w = 0; w < windows; ++w) {
    const std::string prompt = TempFile("window.txt"), rows = TempFile("window.f32");
    WriteFile(prompt, text.substr(w * W, W));
    ASSERT_EQ(RunCommand(Cli("logits --model " + model + " --prompt-file " + prompt +
                             " --all-positions --output " + rows))
                  .exit_code,
              0);
    const std::vector<float> logits = ReadFloats(rows);
    ASSERT_EQ(logits.size(), W * 256);
    for (size_t t = 0; t < W; ++t) {
      double sum = 0;
      for (int v = 0; v < 256; ++v) sum += std::exp(static_cast<double>(logits[t * 256 + v]));
      expected[t] += (std::log(sum) - logits[t * 256 + static_cast<unsigned char>(text[w * W + t + 1])]) /
                     windows;
    }
  }
  std::ifstream in(tsv);
  std::string line;
  std::getline(in, line);  // the header
  EXPECT_EQ(line.rfind("# position", 0), 0u) << line;
  size_t position = 0;
  double loss = 0;
  for (size_t t = 0; t < W; ++t) {
    ASSERT_TRUE(in >> position >> loss) << "line " << t;
    EXPECT_EQ(position, t);
    EXPECT_NEAR(loss, expected[t], 1e-5) << "position " << t;
  }
  for (const char* bad : {" --bucket 4", " --window -1", " --window 100"}) {
    const CommandResult r = RunCommand(
        Cli("perplexity --model " + model + " --text " + text_file + bad) + " 2>&1");
    EXPECT_NE(r.exit_code, 0) << bad;
    EXPECT_TRUE(r.output.find("--window") != std::string::npos ||
                r.output.find("window") != std::string::npos)
        << bad << ": " << r.output;
  }
}

TEST(Cli, PerplexityRefusesTooShortText) {
  REQUIRE_SHARED(kTiny52);
  const std::string text_file = TempFile("one.txt");
  WriteFile(text_file, "x");
  const CommandResult r = RunCommand(
      Cli("perplexity --model " + Quote(SharedPath(kTiny52)) + " --text " + text_file) + " 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("at least 2 tokens"), std::string::npos) << r.output;
}

TEST(Cli, GreedyGenerationIsDeterministicAndMatchesArgmax) {
  REQUIRE_SHARED(kTiny52);
  const std::string model = Quote(SharedPath(kTiny52));
  const std::string cmd =
      Cli("generate --model " + model + " --prompt 'In the beginning' --tokens 40 --temperature 0");
  const CommandResult a = RunCommand(cmd), b = RunCommand(cmd);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_EQ(a.output, b.output);
  ASSERT_EQ(a.output.size(), 40u);  // bytes model: one byte per token, only the continuation
  // Each generated byte is the argmax after the prompt plus what came before it.
  auto m = Model::Load(SharedPath(kTiny52));
  State s = m->NewState();
  std::vector<float> logits;
  const std::string prompt = "In the beginning";
  std::vector<int32_t> ids(prompt.begin(), prompt.end());
  m->Eval(ids, s, &logits);
  for (unsigned char c : a.output) {
    const int32_t best =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ASSERT_EQ(best, c);
    const int32_t tok = c;
    m->Eval({&tok, 1}, s, &logits);
  }
  // English-like: mostly letters and spaces.
  const size_t letters = std::count_if(a.output.begin(), a.output.end(),
                                       [](char c) { return std::isalpha(c) || c == ' '; });
  EXPECT_GE(letters, 36u) << a.output;
}

TEST(Cli, SeededSamplingRepeats) {
  REQUIRE_SHARED(kTiny52);
  const std::string base = Cli("generate --model " + Quote(SharedPath(kTiny52)) +
                               " --prompt 'The ' --tokens 60 --temperature 1 --top-p 0.9");
  const CommandResult a = RunCommand(base + " --seed 7"), b = RunCommand(base + " --seed 7"),
                      c = RunCommand(base + " --seed 8");
  ASSERT_EQ(a.exit_code, 0);
  EXPECT_EQ(a.output, b.output);
  EXPECT_NE(a.output, c.output);
}

TEST(Cli, GenerateRejectsBadSettings) {
  REQUIRE_SHARED(kTiny52);
  const std::string base = Cli("generate --model " + Quote(SharedPath(kTiny52)) + " --prompt x");
  for (const char* bad :
       {" --temperature -1", " --top-p 1.5", " --tokens -3", " --top-k -1", " --temperature abc"}) {
    const CommandResult r = RunCommand(base + bad + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << bad << "\n" << r.output;
  }
  const CommandResult empty =
      RunCommand(Cli("generate --model " + Quote(SharedPath(kTiny52)) + " --prompt ''") + " 2>&1");
  EXPECT_EQ(empty.exit_code, 2) << empty.output;
}

// Every command that writes a file refuses to write it over one of its inputs, whatever the
// path it is reached by, and leaves the input as it was.
TEST(Cli, OutputsNeverOverwriteInputs) {
  REQUIRE_SHARED(kTiny52);
  const std::string model = TempFile("victim.bin");
  std::filesystem::copy_file(SharedPath(kTiny52), model,
                             std::filesystem::copy_options::overwrite_existing);
  const std::vector<uint8_t> model_bytes = ReadFileBytes(model);
  const std::string link = TempFile("victim-link.bin"), hard = TempFile("victim-hard.bin");
  std::filesystem::remove(link);
  std::filesystem::remove(hard);
  std::filesystem::create_symlink(model, link);
  std::filesystem::create_hard_link(model, hard);
  const std::string prompt = TempFile("victim-prompt.txt");
  WriteFile(prompt, "hello");
  for (const std::string& out : {model, link, hard, ProcessTempDir() + "./aviary_cli_victim.bin"}) {
    const CommandResult r = RunCommand(
        Cli("logits --model " + Quote(model) + " --prompt hi --output " + Quote(out)) + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << out << "\n" << r.output;
    EXPECT_NE(r.output.find("refusing to overwrite the input file"), std::string::npos) << r.output;
  }
  CommandResult r = RunCommand(Cli("logits --model " + Quote(model) + " --prompt-file " +
                                   Quote(prompt) + " --output " + Quote(prompt)) +
                               " 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(ReadFileBytes(prompt).size(), 5u);
  // convert: the tokenizer it embeds is an input too.
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  const std::string vocab = TempFile("victim-vocab.txt");
  std::filesystem::copy_file(SharedPath("tokenizers/rwkv_vocab_v20230424.txt"), vocab,
                             std::filesystem::copy_options::overwrite_existing);
  const std::vector<uint8_t> vocab_bytes = ReadFileBytes(vocab);
  r = RunCommand(
      Cli("convert " + Quote(model) + " " + Quote(vocab) + " --tokenizer " + Quote(vocab)) +
      " 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("refusing to overwrite the input file"), std::string::npos) << r.output;
  EXPECT_EQ(ReadFileBytes(vocab), vocab_bytes);
  // chat: +save over the model (or through a link to it) is refused; the chat goes on.
  r = RunCommand("printf '+save " + model + "\\n+save " + link + "\\n+gen x\\n' | " +
                 Cli("chat --model " + Quote(model) + " --gen-tokens 2") + " 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  size_t refusals = 0;
  for (size_t at = 0; (at = r.output.find("refusing to overwrite", at)) != std::string::npos;
       ++at) {
    ++refusals;
  }
  EXPECT_EQ(refusals, 2u) << r.output;
  EXPECT_NE(r.output.find("(2 tokens"), std::string::npos) << r.output;
  EXPECT_EQ(ReadFileBytes(model), model_bytes);
  EXPECT_TRUE(std::filesystem::is_symlink(link));
}

// A write that fails part-way (here the file size limit) leaves the old output whole and no
// temporary behind.
TEST(Cli, FailedWriteLeavesTheOldFileWhole) {
  REQUIRE_SHARED(kTiny52);
  const std::string out = TempFile("kept.f32");
  WriteFile(out, "old contents");
  const CommandResult r =
      RunCommand("trap '' XFSZ; ulimit -f 4; " +
                 Cli("logits --model " + Quote(SharedPath(kTiny52)) +
                     " --prompt 'a prompt of more than sixteen tokens' --all-positions --output " +
                     Quote(out)) +
                 " 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(out + ": write failed"), std::string::npos) << r.output;
  const std::vector<uint8_t> kept = ReadFileBytes(out);
  EXPECT_EQ(std::string(kept.begin(), kept.end()), "old contents");
  EXPECT_FALSE(std::filesystem::exists(out + ".tmp"));
}

// "-" is stdout for logits' output and stdin for prompt files; both give the file's bytes.
TEST(Cli, DashIsStdinAndStdout) {
  REQUIRE_SHARED(kTiny52);
  const std::string model = Quote(SharedPath(kTiny52));
  const std::string file = TempFile("dash.f32"), piped = TempFile("dash-piped.f32");
  ASSERT_EQ(RunCommand(Cli("logits --model " + model +
                           " --prompt 'Dash' --all-positions --output " + file))
                .exit_code,
            0);
  const CommandResult r =
      RunCommand("printf Dash | " + Cli("logits --model " + model +
                                        " --prompt-file - --all-positions --output - > " + piped));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ReadFileBytes(piped), ReadFileBytes(file));
  EXPECT_EQ(ReadFileBytes(file).size(), 4u * 256 * sizeof(float));
}

// A failed write to stdout (a full disk) is an error, not a silent success.
TEST(Cli, FailedStdoutExitsOne) {
  REQUIRE_SHARED(kTiny52);
  if (!std::filesystem::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  const std::string model = Quote(SharedPath(kTiny52));
  const std::string text = TempFile("full.txt");
  WriteFile(text, "Some text to measure.");
  for (const std::string& args :
       {"generate --model " + model + " --prompt hi --tokens 4",
        "tokenize --model " + model + " --text hello", "detokenize --model " + model + " 65 66",
        "info --model " + model, "perplexity --model " + model + " --text " + text,
        "bench --model " + model + " --prompt-tokens 4 --gen-tokens 2 --repeat 1"}) {
    const CommandResult r = RunCommand(Cli(args) + " 2>&1 >/dev/full");
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find("aviary: cannot write to stdout"), std::string::npos) << args << "\n"
                                                                                  << r.output;
  }
  const CommandResult chat = RunCommand(
      "echo '+gen hi' | " + Cli("chat --model " + model + " --gen-tokens 2") + " 2>&1 >/dev/full");
  EXPECT_EQ(chat.exit_code, 1) << chat.output;
  EXPECT_NE(chat.output.find("cannot write to stdout"), std::string::npos) << chat.output;
}

// A model whose logits are NaN: the error says so and where, never "every token is banned".
TEST(Cli, NonFiniteLogitsAreNamed) {
  REQUIRE_SHARED(kTiny52);
  std::vector<uint8_t> bytes = ReadFileBytes(SharedPath(kTiny52));
  // The head [256, 64] is the file's last tensor: its first row (token 0) becomes NaN.
  const size_t head = bytes.size() - 256 * 64 * sizeof(float);
  std::fill(bytes.begin() + head, bytes.begin() + head + 64 * sizeof(float), 0xff);
  const std::string model = TempFile("nan.bin"), text = TempFile("nan.txt");
  WriteFile(model, std::string(bytes.begin(), bytes.end()));
  WriteFile(text, "Some text");
  for (const std::string& args : {"generate --model " + model + " --prompt hi --tokens 3",
                                  "perplexity --model " + model + " --text " + text}) {
    const CommandResult r = RunCommand(Cli(args) + " 2>&1");
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find("logits are not finite at token"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("NaN for token id 0"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("perplexity:"), std::string::npos) << r.output;
  }
  const CommandResult chat =
      RunCommand("echo '+gen hi' | " + Cli("chat --model " + model) + " 2>&1");
  EXPECT_EQ(chat.exit_code, 1) << chat.output;
  EXPECT_NE(chat.output.find("logits are not finite"), std::string::npos) << chat.output;
}

TEST(Cli, SeedsOutOfRangeAreRefused) {
  REQUIRE_SHARED(kTiny52);
  const std::string model = Quote(SharedPath(kTiny52));
  for (const char* seed :
       {"-5", "12345678901234567890123456", "18446744073709551616", "1e3", "x"}) {
    for (const std::string& args :
         {"generate --model " + model + " --prompt hi --tokens 1 --seed " + seed,
          "synth --layers 1 --embd 32 --vocab 16 -o " + TempFile("seed.bin") + " --seed " + seed}) {
      const CommandResult r = RunCommand(Cli(args) + " 2>&1");
      EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
      EXPECT_NE(r.output.find("seed must be a whole number from 0 to 18446744073709551615"),
                std::string::npos)
          << r.output;
    }
  }
  const CommandResult top = RunCommand(
      Cli("generate --model " + model + " --prompt hi --tokens 1 -v --seed 18446744073709551615") +
      " 2>&1");
  EXPECT_EQ(top.exit_code, 0) << top.output;
  EXPECT_NE(top.output.find("seed 18446744073709551615"), std::string::npos) << top.output;
}

TEST(Cli, UnknownCommandIsNamed) {
  const CommandResult r = RunCommand(Cli("frobnicate --model x") + " 2>&1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("unknown command 'frobnicate'"), std::string::npos) << r.output;
}

// logits --all-positions streams its rows: 2,000 rows of 65,536 logits (500 MiB) pass through
// a process that stays far smaller, and the bytes equal a one-row-at-a-time run's.
TEST(Cli, AllPositionsStreamsItsRows) {
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  const std::string model = TempFile("wide-vocab.bin"), prompt = TempFile("long.txt");
  ASSERT_EQ(RunCommand(Cli("synth --layers 1 --embd 64 --vocab 65536 -o " + model)).exit_code, 0);
  std::string text;
  const char* words[] = {"alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "north"};
  for (int i = 0; i < 2000; ++i) text += std::string(i ? " " : "") + words[(i * 7 + i / 3) % 8];
  WriteFile(prompt, text);
  const std::string common = "logits --model " + model + " --tokenizer " +
                             Quote(SharedPath("tokenizers/rwkv_vocab_v20230424.txt")) +
                             " --prompt-file " + prompt + " --all-positions --output ";
  const CommandResult r = RunCommand(Cli(common + "/dev/null"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const double rows = NumberAfter(r.output, "wrote");
  ASSERT_GE(rows, 1500) << r.output;
  struct rusage usage {};
  getrusage(RUSAGE_CHILDREN, &usage);
  const double peak_bytes = usage.ru_maxrss * 1024.0;
  EXPECT_LT(peak_bytes, rows * 65536 * sizeof(float) / 2)
      << "peak RSS " << peak_bytes / 1048576 << " MiB";
  // Chunked rows are the rows of the whole sequence, bit for bit (compared on a shorter text).
  WriteFile(prompt, text.substr(0, 3000));
  const std::string seq = TempFile("stream-seq.f32"), one = TempFile("stream-one.f32");
  ASSERT_EQ(RunCommand(Cli(common + seq)).exit_code, 0);
  ASSERT_EQ(RunCommand(Cli(common + one + " --one-by-one")).exit_code, 0);
  const std::vector<uint8_t> a = ReadFileBytes(seq), b = ReadFileBytes(one);
  EXPECT_GT(a.size(), 256u * 65536 * sizeof(float));  // more than one chunk
  EXPECT_TRUE(a == b);
  for (const std::string& f : {model, seq, one}) std::remove(f.c_str());
}

// On a terminal, generate ends its text with a newline (the shell prompt starts a new line);
// into a pipe the bytes are the continuation alone.
TEST(Cli, GenerateEndsWithANewlineOnATerminal) {
  REQUIRE_SHARED(kTiny52);
  if (std::system("python3 -c 'import pty' 2>/dev/null") != 0) GTEST_SKIP() << "no python3 pty";
  const std::string args = "generate --model " + Quote(SharedPath(kTiny52)) +
                           " --prompt 'In the beginning' --tokens 12 --temperature 0";
  const CommandResult piped = RunCommand(Cli(args));
  ASSERT_EQ(piped.exit_code, 0);
  ASSERT_EQ(piped.output.size(), 12u);
  ASSERT_NE(piped.output.back(), '\n');
  const std::string cli = CliPath() + " " + args;
  const CommandResult tty = RunCommand(
      "python3 -c 'import pty, sys; pty.spawn([\"sh\", \"-c\", sys.argv[1]])' " + Quote(cli));
  ASSERT_EQ(tty.exit_code, 0) << tty.output;
  // The terminal turns "\n" into "\r\n".
  EXPECT_EQ(tty.output, piped.output + "\r\n");
}

// A bandwidth probe of no bytes is refused, not silently left out of the report.
TEST(Cli, BenchRefusesAnEmptyBandwidthProbe) {
  for (const char* mib : {"0", "-1"}) {
    const CommandResult r =
        RunCommand(Cli(std::string("bench --bandwidth --bandwidth-mib ") + mib) + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("--bandwidth-mib"), std::string::npos) << r.output;
  }
}

// synth refuses a model the disk cannot hold before writing anything.
TEST(Cli, SynthChecksTheSizeFirst) {
  const std::string out = TempFile("huge.bin");
  const CommandResult r = RunCommand(Cli("synth --layers 1024 --embd 65536 -o " + out) + " 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("the model needs"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_FALSE(std::filesystem::exists(out + ".tmp"));
}

}  // namespace
}  // namespace aviary::testing
