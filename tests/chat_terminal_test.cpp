// aviary chat in a real terminal: tmux runs it, send-keys types, capture-pane reads the screen.
// Checks the prompt, streaming, Ctrl-C during a reply and at the prompt, history recall, the
// continuation prompt, and quitting with Ctrl-D or a second Ctrl-C. Skips (with the reason)
// when tmux is missing, except in CI (CI=true), where that fails.
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <regex>
#include <thread>

#include "test_data.h"

namespace aviary::testing {
namespace {

const char* kTiny = "models/tiny-rwkv-5v2-730K-FP32.bin";

class ChatTerminalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_SHARED(kTiny);
    if (RunCommand("command -v tmux >/dev/null 2>&1").exit_code != 0) {
      if (InCI()) FAIL() << "tmux is not installed (scripts/install-deps.sh installs it)";
      GTEST_SKIP() << "tmux is not installed: the terminal test needs it (apt-get install tmux)";
    }
    socket_ = "aviary-chat-test-" + std::to_string(::getpid()) + "-" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name();
  }
  void TearDown() override {
    if (!socket_.empty()) Tmux("kill-server");
  }

  CommandResult Tmux(const std::string& args) {
    return RunCommand("tmux -L '" + socket_ + "' " + args + " 2>&1");
  }
  // Starts `aviary chat` in a 150x50 pane through a small script that prints its exit status
  // when it ends ("[exit status N]"); the pane stays after that.
  void Start(const std::string& args) {
    const std::string script = ::testing::TempDir() + socket_ + ".sh";
    {
      std::ofstream f(script);
      // The shell ignores Ctrl-C itself (aviary installs its own handler).
      f << "#!/bin/sh\ntrap '' INT\nLANG=C.UTF-8 LC_ALL=C.UTF-8 '" << CliPath()
        << "' chat --model '" << SharedPath(kTiny) << "' " << args
        << "\necho \"[exit status $?]\"\n";
    }
    const CommandResult r = Tmux("-f /dev/null new-session -d -s chat -x 150 -y 50 'sh " + script +
                                 "' \\; set-option -t chat remain-on-exit on");
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  void Keys(const std::string& keys) {
    const CommandResult r = Tmux("send-keys -t chat " + keys);
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  // The screen and its scrollback, wrapped lines joined.
  std::string Screen() { return Tmux("capture-pane -p -J -S -200 -t chat").output; }
  // The last non-empty line on the screen, trailing spaces removed.
  std::string LastLine() {
    const std::string s = Screen();
    size_t end = s.find_last_not_of(" \n");
    if (end == std::string::npos) return "";
    const size_t begin = s.rfind('\n', end);
    return s.substr(begin == std::string::npos ? 0 : begin + 1,
                    end + 1 - (begin == std::string::npos ? 0 : begin + 1));
  }
  bool WaitFor(const std::function<bool()>& done, double seconds = 30) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return done();
  }
  bool WaitForText(const std::string& text, double seconds = 30) {
    return WaitFor([&] { return Screen().find(text) != std::string::npos; }, seconds);
  }
  bool WaitForPrompt(const std::string& line = "User:") {
    return WaitFor([&] { return LastLine() == line; });
  }
  size_t Count(const std::string& text) {
    const std::string s = Screen();
    size_t n = 0;
    for (size_t p = s.find(text); p != std::string::npos; p = s.find(text, p + 1)) ++n;
    return n;
  }

  std::string socket_;
};

TEST_F(ChatTerminalTest, PromptStreamingCtrlCAndHistory) {
  // "\n" (byte 10) is banned: replies never end by themselves, so Ctrl-C has one to stop.
  Start("--seed 1 --ban 10 --max-tokens 1000000");
  ASSERT_TRUE(WaitForText("Type +help")) << Screen();
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  EXPECT_NE(Screen().find("template:  world (User: / Assistant:)"), std::string::npos) << Screen();

  Keys("'+state' Enter");
  ASSERT_TRUE(WaitForText("tokens seen: 0")) << Screen();
  ASSERT_TRUE(WaitForPrompt()) << Screen();

  // A reply streams: it grows on screen while it is being generated.
  Keys("'hello there' Enter");
  ASSERT_TRUE(WaitForText("Assistant:")) << Screen();
  auto reply_length = [&] {
    const std::string s = Screen();
    const size_t p = s.rfind("Assistant:");
    return p == std::string::npos ? size_t{0} : s.find_last_not_of(" \n") - p;
  };
  ASSERT_TRUE(WaitFor([&] { return reply_length() > 20; })) << Screen();
  const size_t early = reply_length();
  ASSERT_TRUE(WaitFor([&] { return reply_length() > early + 20; })) << Screen();
  EXPECT_EQ(Screen().find("tokens/s"), std::string::npos) << "the reply ended by itself";

  // Ctrl-C stops the reply; the prompt comes back and the conversation holds the partial reply.
  Keys("C-c");
  ASSERT_TRUE(WaitForText("tokens/s, stopped)")) << Screen();
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  Keys("'+state' Enter");
  ASSERT_TRUE(WaitForText("1 messages, 1 replies")) << Screen();
  const std::string screen = Screen();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(screen, m, std::regex("stopped\\)[\\s\\S]*tokens seen: ([0-9]+)")))
      << screen;
  EXPECT_GT(std::stoi(m[1]), 20);
  ASSERT_TRUE(WaitForPrompt()) << Screen();

  // History: Up recalls the previous lines.
  Keys("Up");
  ASSERT_TRUE(WaitForPrompt("User: +state")) << Screen();
  Keys("Up");
  ASSERT_TRUE(WaitForPrompt("User: hello there")) << Screen();
  // Ctrl-C at the prompt clears the line and gives a new prompt.
  Keys("C-c");
  ASSERT_TRUE(WaitForText("(Ctrl-C again or Ctrl-D to quit)")) << Screen();
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  EXPECT_EQ(Screen().find("[exit status"), std::string::npos);

  // A trailing backslash asks for the next line.
  Keys("'first line \\' Enter");
  ASSERT_TRUE(WaitForPrompt("...")) << Screen();
  Keys("C-c");  // drops the whole unfinished message
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  Keys("'+state' Enter");
  ASSERT_TRUE(WaitFor([&] { return Count("1 messages, 1 replies") == 2; })) << Screen();

  // Two Ctrl-C in a row on an empty prompt quit, with exit status 0.
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  Keys("C-c");
  ASSERT_TRUE(WaitFor([&] { return Count("(Ctrl-C again or Ctrl-D to quit)") == 3; })) << Screen();
  Keys("C-c");
  ASSERT_TRUE(WaitForText("[exit status 0]")) << Screen();
}

TEST_F(ChatTerminalTest, CtrlDQuits) {
  Start("--seed 1 --max-tokens 40");
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  Keys("'+help' Enter");
  ASSERT_TRUE(WaitForText("+exit")) << Screen();
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  Keys("'hi' Enter");
  ASSERT_TRUE(WaitForText("tokens/s")) << Screen();  // a short reply ends by itself
  ASSERT_TRUE(WaitForPrompt()) << Screen();
  Keys("C-d");
  ASSERT_TRUE(WaitForText("[exit status 0]")) << Screen();
}

}  // namespace
}  // namespace aviary::testing
