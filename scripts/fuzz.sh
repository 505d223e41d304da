#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang, ASan and UBSan in build-fuzz/, seeds their
# corpora, and runs each target for FUZZ_SECONDS (default 60). Exits non-zero when a target
# finds a crash, a leak, a timeout or an out-of-memory (the input is saved under
# build-fuzz/artifacts/). Corpora persist in build-fuzz/corpus-* between runs.
#
#   FUZZ_SECONDS=30 scripts/fuzz.sh            # all targets
#   FUZZ_TARGETS=fuzz_state_file scripts/fuzz.sh
#   build-fuzz/fuzz/fuzz_rwkvcpp_bin build-fuzz/artifacts/crash-...   # replay one input
#
# Reads ../shared (or $AVIARY_SHARED_DIR) and never writes there: seeds are copied.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
shared=${AVIARY_SHARED_DIR:-$root/../shared}
shared=$(cd "$shared" && pwd)
build=$root/build-fuzz
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"fuzz_rwkvcpp_bin fuzz_state_file"}
state_model=${AVIARY_FUZZ_MODEL:-$shared/models/stress/stress-rwkv-7v0-FP16.bin}

echo "== configuring and building in $build"
mkdir -p "$build"
CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S "$root" -B "$build" -DAVIARY_FUZZ=ON \
  -DAVIARY_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j"${FUZZ_BUILD_JOBS:-2}" --target fuzz_rwkvcpp_bin fuzz_state_file make_seeds

corpus_bin=$build/corpus-rwkvcpp-bin
corpus_state=$build/corpus-state-file
artifacts=$build/artifacts
mkdir -p "$corpus_bin" "$corpus_state" "$artifacts"

echo "== seeding $corpus_bin and $corpus_state"
"$build/fuzz/make_seeds" "$shared/models" "$corpus_bin" "$state_model" "$corpus_state" ||
  echo "(some seeds could not be made; going on with the rest)"
# Small real files, copied (libFuzzer may replace files in its corpus folder).
for f in quantized/tiny-rwkv-5v1-730K-Q4_0.bin tiny-rwkv-5v1-730K-Q5_0.bin; do
  [[ -f "$shared/models/$f" ]] && cp -f "$shared/models/$f" "$corpus_bin/real-$(basename "$f")"
done
# Truncated headers, from a synthetic seed.
if [[ -f "$corpus_bin/seed-7v0-FP16.bin" ]]; then
  for n in 3 4 23 24 36 60 100; do
    head -c "$n" "$corpus_bin/seed-7v0-FP16.bin" >"$corpus_bin/cut-$n.bin"
  done
fi
if [[ -f "$corpus_state/seed-used.state" ]]; then
  head -c 40 "$corpus_state/seed-used.state" >"$corpus_state/cut-40.state"
fi

status=0
summary=()
for target in $targets; do
  case $target in
    # Synthetic seeds are under 80 KB; the real ones are read truncated to this.
    fuzz_rwkvcpp_bin) corpus=$corpus_bin; max_len=${FUZZ_MAX_LEN:-131072} ;;
    fuzz_state_file) corpus=$corpus_state; max_len=262144 ;;
    *) echo "unknown target $target"; exit 2 ;;
  esac
  log=$build/$target.log
  echo "== $target for ${seconds}s (log: $log)"
  set +e
  AVIARY_FUZZ_MODEL=$state_model UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/fuzz/$target" "$corpus" -max_total_time="$seconds" -max_len="$max_len" \
    -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/$target-" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  if [[ $rc -ne 0 ]]; then
    status=1
    summary+=("$target: FAILED (exit $rc) after ${runs:-?} runs; see $log and $artifacts")
    grep -E 'ERROR|SUMMARY|runtime error|deadly signal|Test unit written' "$log" | head -20 || true
  else
    summary+=("$target: ok, ${runs:-?} runs in ${seconds}s, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l) files")
  fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
