#!/usr/bin/env bash
# Builds aviary twice and runs every check: one clang build with AddressSanitizer +
# UndefinedBehaviorSanitizer that holds both the libFuzzer targets (run for a bounded time) and
# the tests (run under the sanitizers), then the Release build and its tests. One sanitized
# build instead of two (fuzz targets, tests) saves a third of CI on 2 cores. Test data comes
# from ../shared (read-only). FUZZ_SECONDS sets the time per fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

echo "== sanitized build (clang; ASan + UBSan; tests and libFuzzer targets) ($(date -u +%T))"
# Line tables are all a sanitizer report needs (file:line in each frame); full debug info and
# GNU ld make this build's compiles and its ~50 links markedly slower.
CC=clang CXX=clang++ cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O2 -gline-tables-only -DNDEBUG" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -gline-tables-only -DNDEBUG" \
  -DCMAKE_EXE_LINKER_FLAGS=-fuse-ld=lld -DCMAKE_SHARED_LINKER_FLAGS=-fuse-ld=lld \
  -DAVIARY_SANITIZE=ON -DAVIARY_FUZZ=ON >/dev/null
cmake --build build-asan -j"$jobs"

# 30 s per target, one target per core at a time.
export FUZZ_SECONDS=${FUZZ_SECONDS:-30}
echo "== fuzz (${FUZZ_SECONDS} s per target) ($(date -u +%T))"
FUZZ_BUILD_DIR=build-asan bash scripts/fuzz.sh

echo "== ASan + UBSan tests ($(date -u +%T))"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j"$jobs")

echo "== Release build and tests ($(date -u +%T))"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j"$jobs")
echo "== done ($(date -u +%T))"
