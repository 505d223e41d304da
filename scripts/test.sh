#!/usr/bin/env bash
# Builds aviary three ways and runs every check: libFuzzer targets for a bounded time,
# the tests under AddressSanitizer + UndefinedBehaviorSanitizer, then the tests in Release.
# Test data comes from ../shared (read-only). FUZZ_SECONDS sets the time per fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

# 30 s per target keeps the whole run near 30 minutes on 2 cores (7 targets).
export FUZZ_SECONDS=${FUZZ_SECONDS:-30}
echo "== fuzz (${FUZZ_SECONDS} s per target)"
bash scripts/fuzz.sh

echo "== ASan + UBSan build and tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAVIARY_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j"$jobs")

echo "== Release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j"$jobs")
