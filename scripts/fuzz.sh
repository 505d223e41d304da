#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang, ASan and UBSan in build-fuzz/, seeds their
# corpora, and runs each target for FUZZ_SECONDS (default 60), FUZZ_JOBS targets at a time
# (default: the number of cores). FUZZ_BUILD_DIR names another build folder to use instead
# (scripts/test.sh passes its sanitized build, configured with AVIARY_FUZZ=ON and the tests, so
# CI compiles the instrumented library once). Exits non-zero when a target finds a crash, a leak, a timeout or an out-of-memory (the input is saved under
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
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
[[ $build == /* ]] || build=$root/$build
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"fuzz_rwkvcpp_bin fuzz_state_file fuzz_world_tokenizer fuzz_vocab_file fuzz_pth fuzz_safetensors fuzz_gguf fuzz_train_data fuzz_checkpoint_meta fuzz_openai_request"}
state_model=${AVIARY_FUZZ_MODEL:-$shared/models/stress/stress-rwkv-7v0-FP16.bin}

mkdir -p "$build"
if grep -q '^AVIARY_FUZZ:BOOL=ON' "$build/CMakeCache.txt" 2>/dev/null; then
  echo "== building in $build (configured with AVIARY_FUZZ=ON already)"
else
  echo "== configuring and building in $build"
  CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S "$root" -B "$build" -DAVIARY_FUZZ=ON \
    -DAVIARY_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
fi
cmake --build "$build" -j"${FUZZ_BUILD_JOBS:-2}" --target fuzz_rwkvcpp_bin fuzz_state_file fuzz_world_tokenizer fuzz_vocab_file fuzz_pth fuzz_safetensors fuzz_gguf fuzz_train_data fuzz_checkpoint_meta fuzz_openai_request make_seeds

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

# Tokenizers: the test corpus (text, code, emoji, invalid UTF-8) for the World tokenizer; the
# head of the real World vocabulary (all 256 byte tokens) and small tokenizer.json files for
# the parsers.
world_vocab=${AVIARY_FUZZ_WORLD_VOCAB:-$shared/tokenizers/rwkv_vocab_v20230424.txt}
corpus_world=$build/corpus-world-tokenizer
corpus_vocab=$build/corpus-vocab-file
mkdir -p "$corpus_world" "$corpus_vocab"
cp -f "$root"/tests/data/tokenizer_corpus/* "$corpus_world/"
if [[ -f "$world_vocab" ]]; then
  head -n 300 "$world_vocab" >"$corpus_vocab/world-head-300.txt"
  sed -n '10000,10040p' "$world_vocab" >"$corpus_vocab/world-middle.txt"
fi
printf '%s' '{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]},"normalizer":{"type":"NFC"},"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false},"added_tokens":[{"id":3,"content":"<|endoftext|>","special":true}]}' \
  >"$corpus_vocab/mini-tokenizer.json"

# PyTorch .pth and safetensors: the shared checkpoints (copied), and the pickle inside a .pth
# (fuzz_pth feeds inputs starting with 0x80 straight to the unpickler, since a mutated pickle
# inside a zip stops at its CRC).
corpus_pth=$build/corpus-pth
corpus_safetensors=$build/corpus-safetensors
mkdir -p "$corpus_pth" "$corpus_safetensors"
for f in "$shared"/models/pth/*.pth; do
  [[ -f "$f" ]] && cp -f "$f" "$corpus_pth/"
done
for f in "$shared"/models/pth/*.safetensors; do
  [[ -f "$f" ]] && cp -f "$f" "$corpus_safetensors/"
done
if command -v python3 >/dev/null; then
  for f in "$shared"/models/pth/*.pth; do
    [[ -f "$f" ]] && python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
open(sys.argv[2], "wb").write(z.read(name))' "$f" "$corpus_pth/$(basename "$f" .pth).pkl" || true
  done
fi

# GGUF: the small .bin seeds written again as GGUF (v6/v7 in llama.cpp's layout, v4/v5 in
# aviary's own).
corpus_gguf=$build/corpus-gguf
mkdir -p "$corpus_gguf"
"$build/fuzz/make_seeds" --gguf "$corpus_bin" "$corpus_gguf" ||
  echo "(no GGUF seeds could be made; going on without them)"

# Training data: binidx indexes as the writer makes them and JSONL files, good and bad.
corpus_train=$build/corpus-train-data
mkdir -p "$corpus_train"
"$build/fuzz/make_seeds" --train-data "$corpus_train" ||
  echo "(no training data seeds could be made; going on without them)"
# Training checkpoints: the index (meta.json) of small ones, as SaveCheckpoint writes it.
corpus_checkpoint=$build/corpus-checkpoint-meta
mkdir -p "$corpus_checkpoint"
"$build/fuzz/make_seeds" --checkpoint "$corpus_checkpoint" ||
  echo "(no checkpoint seeds could be made; going on without them)"
# ... and LoRA adapter descriptions (adapter.json), which the same target parses.
printf '%s' '{"format":"aviary-lora","version":1,"lora_rank":16,"lora_alpha":16.0,"targets":["att.receptance","att.key","att.value","att.output","ffn.key","ffn.value"],"base_model":"m.gguf","base_fingerprint":123,"n_layer":4,"n_embd":128,"n_ffn":512}' \
  >"$corpus_checkpoint/adapter.json"
printf '%s' '{"format":"aviary-lora","lora_rank":0,"lora_alpha":-1,"targets":["att.gate"],"n_layer":4,"n_embd":128}' \
  >"$corpus_checkpoint/adapter-bad.json"

# OpenAI API request bodies: chat and completions, minimal and with every field, and a few
# shapes the parsers refuse.
corpus_openai=$build/corpus-openai-request
mkdir -p "$corpus_openai"
printf '%s' '{"model":"m","messages":[{"role":"user","content":"hi"}]}' >"$corpus_openai/chat-min.json"
printf '%s' '{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"a"}]},{"role":"assistant","content":null}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":10,"max_completion_tokens":20,"temperature":0.7,"top_p":0.5,"presence_penalty":-1,"frequency_penalty":1.5,"seed":42,"n":2,"stop":["\n","User:"],"user":"u","penalty_decay":0.99,"state":"s1","tools":[]}' \
  >"$corpus_openai/chat-full.json"
printf '%s' '{"model":"m","prompt":"Once upon","max_tokens":5,"stop":"\n","stream":false}' >"$corpus_openai/completion.json"
printf '%s' '{"model":"m","prompt":["a"],"n":9,"temperature":3,"seed":-1}' >"$corpus_openai/completion-bad.json"
printf '%s' '{"id":"pirate","messages":[{"role":"system","content":"Arr"}],"state":"s"}' \
  >"$corpus_openai/state-chat.json"
printf '%s' '{"id":"p.1","prompt":"The ship"}' >"$corpus_openai/state-prompt.json"

# One target's run; its summary line goes to $build/$target.summary. Targets run FUZZ_JOBS at a
# time (default: one per core): each is single-threaded, so the cores stay busy.
fuzz_one() {
  local target=$1 corpus max_len
  case $target in
    # Synthetic seeds are under 80 KB; the real ones are read truncated to this.
    fuzz_rwkvcpp_bin) corpus=$corpus_bin; max_len=${FUZZ_MAX_LEN:-131072} ;;
    fuzz_state_file) corpus=$corpus_state; max_len=262144 ;;
    fuzz_world_tokenizer) corpus=$corpus_world; max_len=8192 ;;
    fuzz_vocab_file) corpus=$corpus_vocab; max_len=65536 ;;
    # The real checkpoints are 1.5-3.4 MB: keep them whole.
    fuzz_pth) corpus=$corpus_pth; max_len=4194304 ;;
    fuzz_safetensors) corpus=$corpus_safetensors; max_len=4194304 ;;
    fuzz_gguf) corpus=$corpus_gguf; max_len=1048576 ;;
    fuzz_train_data) corpus=$corpus_train; max_len=65536 ;;
    fuzz_checkpoint_meta) corpus=$corpus_checkpoint; max_len=16384 ;;
    # Above the target's 4096-byte body limit, so that the size check is reached too.
    fuzz_openai_request) corpus=$corpus_openai; max_len=8192 ;;
    *) echo "$target: unknown target" >"$build/$target.summary"; return 2 ;;
  esac
  local log=$build/$target.log rc runs cov
  echo "== $target for ${seconds}s (log: $log)"
  set +e
  AVIARY_FUZZ_MODEL=$state_model AVIARY_FUZZ_WORLD_VOCAB=$world_vocab UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/fuzz/$target" "$corpus" -max_total_time="$seconds" -max_len="$max_len" \
    -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/$target-" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  if [[ $rc -ne 0 ]]; then
    {
      echo "$target: FAILED (exit $rc) after ${runs:-?} runs; see $log and $artifacts"
      grep -E 'ERROR|SUMMARY|runtime error|deadly signal|Test unit written' "$log" | head -20 || true
    } >"$build/$target.summary"
    return 1
  fi
  echo "$target: ok, ${runs:-?} runs in ${seconds}s, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l) files" \
    >"$build/$target.summary"
}

jobs=${FUZZ_JOBS:-$(nproc)}
status=0
running=0
for target in $targets; do
  rm -f "$build/$target.summary"
  if ((running >= jobs)); then
    wait -n || status=1
    running=$((running - 1))
  fi
  fuzz_one "$target" &
  running=$((running + 1))
done
while ((running > 0)); do
  wait -n || status=1
  running=$((running - 1))
done

echo "== summary"
for target in $targets; do
  cat "$build/$target.summary" 2>/dev/null || { echo "$target: no result"; status=1; }
done
exit $status
