// aviary: run RWKV language models. One subcommand per file (cmd_*.cpp).
// Exit codes: 0 success, 1 bad input (file, token, data), 2 usage error.
#include <cstdio>

#include "aviary/error.h"
#include "cli_common.h"
#include "environment.h"

int main(int argc, char** argv) {
  CLI::App app{"aviary: run RWKV language models (v4, v5.1, v5.2, v6, v7)", "aviary"};
  app.set_version_flag("--version", "aviary 0.1.0");
  app.require_subcommand(1);
  app.fallthrough(false);
  app.footer(aviary::cli::EnvironmentHelp());
  aviary::cli::RegisterInfo(app);
  aviary::cli::RegisterLogits(app);
  aviary::cli::RegisterGenerate(app);
  aviary::cli::RegisterPerplexity(app);
  aviary::cli::RegisterTokenize(app);
  aviary::cli::RegisterConvert(app);
  aviary::cli::RegisterPull(app);
  aviary::cli::RegisterBench(app);
  aviary::cli::RegisterSynth(app);
  aviary::cli::RegisterChat(app);
  aviary::cli::RegisterTrain(app);
  aviary::cli::RegisterEstimate(app);
  aviary::cli::RegisterServe(app);
  // CLI11 reads an unknown first word as a stray argument ("A subcommand is required").
  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known = known || sub->check_name(argv[1]);
    }
    if (!known) {
      std::fprintf(stderr, "aviary: unknown command '%s' (see aviary --help)\n", argv[1]);
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
    aviary::cli::CheckStdout();
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "aviary: %s (see aviary --help)\n", e.what());
    return 2;
  } catch (const aviary::UsageError& e) {
    std::fprintf(stderr, "aviary: %s\n", e.what());
    return 2;
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "aviary: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "aviary: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "aviary: internal error: %s\n", e.what());
    return 3;
  }
  return 0;
}
