#!/usr/bin/env bash
# Installs the Debian packages aviary builds and tests with. Safe to run again.
set -euo pipefail
packages=(cmake g++ make pkg-config libgtest-dev libgmock-dev libcli11-dev nlohmann-json3-dev
  libpcre2-dev libicu-dev libcurl4-openssl-dev libssl-dev zlib1g-dev clang libclang-rt-14-dev
  libhwy-dev libbenchmark-dev libedit-dev tmux gnuplot-nox python3-torch python3-numpy
  libcpp-httplib-dev nodejs chromium nginx-light curl openmpi-bin libopenmpi-dev lld)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# The client-side tests of `aviary serve` (tests/serve): OpenAI's Node client and puppeteer-core,
# pinned by the lockfile; installed again only when the lockfile is newer than node_modules.
serve_tests="$(cd "$(dirname "$0")/.." && pwd)/tests/serve"
if [[ ! -d $serve_tests/node_modules || $serve_tests/package-lock.json -nt $serve_tests/node_modules ]]; then
  if command -v npm >/dev/null; then
    npm ci --prefix "$serve_tests" --ignore-scripts --no-audit --no-fund
    touch "$serve_tests/node_modules"
  else
    echo "npm not found: the tests in tests/serve need Node.js 20 or later with npm" >&2
  fi
fi
echo "dependencies ready: ${packages[*]} and tests/serve/node_modules"
