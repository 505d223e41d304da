#!/usr/bin/env bash
# Installs the Debian packages aviary builds and tests with. Safe to run again.
set -euo pipefail
packages=(cmake g++ make pkg-config libgtest-dev libgmock-dev libcli11-dev nlohmann-json3-dev
  libpcre2-dev libicu-dev libcurl4-openssl-dev libssl-dev zlib1g-dev clang libclang-rt-14-dev
  libhwy-dev libbenchmark-dev libedit-dev tmux gnuplot-nox python3-torch python3-numpy
  libcpp-httplib-dev nodejs nginx-light curl)
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
echo "dependencies ready: ${packages[*]}"
