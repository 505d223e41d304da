// aviary pull: download a model (and the tokenizer file it needs) into the cache folder.
#include <cstdio>
#include <memory>

#include "aviary/error.h"
#include "cli_common.h"
#include "environment.h"
#include "hub/pull.h"

namespace aviary::cli {
namespace {

struct PullCliOptions {
  std::string target, dir;
  bool list = false;
  bool quiet = false;
  int retries = 5;
  long stall_timeout = 0;  // 0: $AVIARY_STALL_TIMEOUT or 60
  long connect_timeout = 30;
};

void RunPull(const PullCliOptions& o) {
  if (o.list) {
    if (!o.target.empty()) throw UsageError("--list takes no model name");
    const std::string table = hub::FormatCatalogList(Hub());
    std::fwrite(table.data(), 1, table.size(), stdout);
    return;
  }
  if (o.target.empty()) {
    throw UsageError(
        "give a model name or an https:// URL to pull (aviary pull --list shows the names)");
  }
  hub::PullOptions p;
  p.hub = Hub();
  p.dir = o.dir;
  if (auto env = ProcessEnvironment().stall_timeout_s) p.download.stall_timeout_s = *env;
  if (o.stall_timeout > 0) p.download.stall_timeout_s = o.stall_timeout;
  p.download.connect_timeout_s = o.connect_timeout;
  p.download.retries = o.retries;
  if (o.quiet) {
    p.download.log = nullptr;
    p.download.progress = hub::ProgressStyle::kNone;
  }
  const hub::PullResult r = hub::Pull(o.target, p);
  if (!o.quiet && !r.tokenizer_path.empty()) {
    std::fprintf(stderr, "tokenizer: %s\n", r.tokenizer_path.c_str());
  }
  std::printf("%s\n", r.path.c_str());  // stdout holds only the path: M=$(aviary pull NAME)
}

}  // namespace

void RegisterPull(CLI::App& app) {
  auto o = std::make_shared<PullCliOptions>();
  CLI::App* cmd = app.add_subcommand(
      "pull",
      "Download a model (and the tokenizer file it needs) from Hugging Face into the cache");
  cmd->add_option(
      "target", o->target,
      "A catalog name (see --list), world-vocab / neox-20b-tokenizer, or an http(s) URL");
  cmd->add_flag("--list", o->list, "List the catalog: sizes, tokenizer, whether already cached");
  cmd->add_option("--dir", o->dir, "Download into this folder instead of the cache");
  cmd->add_flag("-q,--quiet", o->quiet, "No progress or notes; only the final path (and errors)");
  cmd->add_option("--retries", o->retries,
                  "Resume this many times after a dropped or stalled transfer")
      ->capture_default_str()
      ->check(CLI::Range(0, 100));
  cmd->add_option("--stall-timeout", o->stall_timeout,
                  "Seconds under 1 KiB/s before a transfer counts as stalled (default "
                  "$AVIARY_STALL_TIMEOUT, else 60)")
      ->check(CLI::Range(1L, 86400L));
  cmd->add_option("--connect-timeout", o->connect_timeout, "Seconds to wait for a connection")
      ->capture_default_str()
      ->check(CLI::Range(1L, 3600L));
  cmd->callback([o] { RunPull(*o); });
}

}  // namespace aviary::cli
