#!/usr/bin/env bash
# `aviary serve` under load, on a model of the RWKV-7 0.4B shape (aviary synth, 24 x 1024,
# vocabulary 65536, world tokenizer):
#  1. batching: tests/serve/load_test.mjs (CLIENTS streaming clients for SECONDS, greedy, every
#     reply checked against `aviary generate --temperature 0` or the request sent alone) against
#     `--parallel 1` and `--parallel CLIENTS`, one after the other: aggregate completion
#     tokens/s, their ratio, time to first token p50/p99;
#  2. the state cache: a TURNS-turn chat (bench/serve_conversation.mjs: each turn resends the
#     whole conversation plus a new user message) with `--state-cache-mb CACHE_MB` and with
#     `--state-cache-mb 0`: time to first token of the last turn (median over REPEATS
#     conversations), and the cache's bytes from /metrics against its budget.
# Results: a table on stdout and JSON files in OUT_DIR. docs/PERFORMANCE.md#serving has the
# method and a table.
#
# usage: AVIARY_BIN=build/aviary bash bench/serve_bench.sh [--model FILE] [--tokenizer FILE]
#   [--type q8_0] [--clients 32] [--seconds 60] [--max-tokens 64] [--threads 2] [--turns 10]
#   [--user-words 60] [--cache-mb 256] [--repeats 3] [--out DIR] [--skip-batching] [--skip-cache]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
aviary=${AVIARY_BIN:-$root/build/aviary}
model=""
tokenizer=$(cd "$root/.." && pwd)/shared/tokenizers/rwkv_vocab_v20230424.txt
type=q8_0
clients=32
seconds=60
max_tokens=64
threads=2
turns=10
user_words=60
cache_mb=256
repeats=3
out=""
do_batching=1
do_cache=1
while (($#)); do
  case $1 in
    --model) model=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --turns) turns=$2; shift 2 ;;
    --user-words) user_words=$2; shift 2 ;;
    --cache-mb) cache_mb=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --skip-batching) do_batching=0; shift ;;
    --skip-cache) do_cache=0; shift ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
  esac
done
[[ -x $aviary ]] || { echo "no aviary binary at $aviary (set AVIARY_BIN)" >&2; exit 2; }
command -v node >/dev/null || { echo "needs node (apt install nodejs)" >&2; exit 2; }
[[ -f $tokenizer ]] || { echo "tokenizer not found: $tokenizer" >&2; exit 2; }
out=${out:-$root/build/serve-bench}
mkdir -p "$out"

# ---- The model.
if [[ -z $model ]]; then
  model=$out/rwkv7-0.4b-$type.bin
  [[ -f $model ]] || "$aviary" synth --version 7 --layers 24 --embd 1024 --type "$type" -o "$model" >&2
fi

server_pid=""
stop_server() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT
# start_server NAME ARGS...: sets $url.
start_server() {
  local name=$1
  shift
  "$aviary" serve --model "$model" --tokenizer "$tokenizer" --host 127.0.0.1 --port 0 \
    --threads "$threads" "$@" >"$out/$name.stdout" 2>"$out/$name.stderr" &
  server_pid=$!
  local line="" t
  for ((t = 0; t < 1200; ++t)); do
    line=$(grep -m1 '^aviary serve: listening on ' "$out/$name.stdout" || true)
    [[ -n $line ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$out/$name.stderr" >&2; exit 1; }
    sleep 0.1
  done
  [[ -n $line ]] || { echo "$name: no listening line" >&2; exit 1; }
  url=${line#aviary serve: listening on }
}
json() { node -e "const j = JSON.parse(require('fs').readFileSync('$1', 'utf8')); console.log($2)"; }

echo "model: $model ($(du -h "$model" | cut -f1)), tokenizer $(basename "$tokenizer"), $threads threads, $(nproc) cores"

# ---- 1. Batching.
if ((do_batching)); then
  # The prompts (one per client) and their greedy replies from `aviary generate`, the reference
  # every streamed completion must equal.
  node -e "
    const seeds = ['The old lighthouse keeper climbed the stairs', 'In the beginning the river was',
      'My grandmother always said that bread', 'The spaceship drifted past the moons of',
      'A recipe for a quiet afternoon:', 'The committee met on Tuesday to decide',
      'Under the bridge, the fox waited for', 'Dear diary, today the garden'];
    console.log(JSON.stringify(Array.from({length: $clients}, (_, i) => seeds[i % seeds.length] + ' (story ' + (i + 1) + ')')));
  " >"$out/prompts.new.json"
  # Kept when unchanged, so the expected replies below are computed once per model and prompts.
  cmp -s "$out/prompts.new.json" "$out/prompts.json" && rm "$out/prompts.new.json" ||
    mv "$out/prompts.new.json" "$out/prompts.json"
  expected=$out/expected-$(basename "$model" .bin)-$max_tokens.json
  if [[ ! -f $expected || $out/prompts.json -nt $expected || $model -nt $expected ]]; then
    echo "expected replies: aviary generate --temperature 0 --tokens $max_tokens, $clients prompts" >&2
    node -e "
      const { execFileSync } = require('child_process');
      const prompts = JSON.parse(require('fs').readFileSync('$out/prompts.json', 'utf8'));
      const completion = {};
      for (const p of prompts)
        completion[p] = execFileSync('$aviary', ['generate', '--model', '$model', '--tokenizer', '$tokenizer',
          '--threads', '$threads', '--temperature', '0', '--tokens', '$max_tokens', '--prompt', p]).toString('utf8');
      console.log(JSON.stringify({ completion }));
    " >"$expected.new" && mv "$expected.new" "$expected"
  fi
  # The chat replies come from the first run's requests sent alone, then serve the second run.
  # SOLO_WHOLE=no asks them streamed only (not also as whole replies).
  solo_whole=""
  [[ ${SOLO_WHOLE:-yes} == no ]] && solo_whole="--solo-whole no"
  rm -f "$out/expected-all.json"
  for parallel in 1 "$clients"; do
    echo "load: --parallel $parallel, $clients clients, $seconds s" >&2
    start_server "parallel-$parallel" --parallel "$parallel" --queue $((clients * 2))
    node "$root/tests/serve/load_test.mjs" --url "$url" --clients "$clients" --seconds "$seconds" \
      --max-tokens "$max_tokens" --prompts "$out/prompts.json" --expected "$expected" \
      --save-expected "$out/expected-all.json" $solo_whole \
      --out "$out/load-parallel-$parallel.json" >/dev/null || echo "load test FAILED (--parallel $parallel)" >&2
    [[ -f $out/expected-all.json ]] && expected=$out/expected-all.json
    stop_server
  done
fi

# ---- 2. The state cache.
if ((do_cache)); then
  for mb in "$cache_mb" 0; do
    start_server "cache-$mb" --state-cache-mb "$mb"
    for ((r = 1; r <= repeats; ++r)); do
      echo "conversation: --state-cache-mb $mb, run $r of $repeats" >&2
      node "$here/serve_conversation.mjs" --url "$url" --turns "$turns" --max-tokens "$max_tokens" \
        --user-words "$user_words" --tag "cache$mb-run$r" --out "$out/conversation-cache$mb-$r.json" >/dev/null
    done
    stop_server
  done
fi

# ---- The table.
node - "$out" "$clients" "$cache_mb" "$repeats" "$do_batching" "$do_cache" <<'EOF'
const fs = require('fs');
const [out, clients, cacheMb, repeats, doBatching, doCache] = process.argv.slice(2);
const read = (f) => JSON.parse(fs.readFileSync(`${out}/${f}`, 'utf8'));
const median = (v) => { const s = [...v].sort((a, b) => a - b); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
if (doBatching === '1') {
  const a = read('load-parallel-1.json');
  const b = read(`load-parallel-${clients}.json`);
  const row = (name, j) => {
    const ok = Object.entries(j.requests ?? {}).map(([k, v]) => `${k} ${v.ok}/${v.ok + v.failed}`).join(', ');
    return `| ${name} | ${j.tokens_per_s} | ${j.ttft_ms?.p50} | ${j.ttft_ms?.p99} | ${j.latency_ms?.p50} | ${j.latency_ms?.p99} | ${ok} | ${j.failure_count} |`;
  };
  console.log(`| server | completion tokens/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | requests ok/sent | failures |`);
  console.log('|---|---:|---:|---:|---:|---:|---|---:|');
  console.log(row('--parallel 1', a));
  console.log(row(`--parallel ${clients}`, b));
  console.log(`batching: ${(b.tokens_per_s / a.tokens_per_s).toFixed(2)}x the tokens/s of --parallel 1 (target >= 4x)\n`);
}
if (doCache === '1') {
  const runs = (mb) => Array.from({ length: Number(repeats) }, (_, i) => read(`conversation-cache${mb}-${i + 1}.json`));
  const on = runs(cacheMb), off = runs(0);
  const last = (r) => r.per_turn.at(-1);
  const onT = median(on.map((r) => last(r).ttft_ms)), offT = median(off.map((r) => last(r).ttft_ms));
  const bytes = on.flatMap((r) => r.metrics_per_turn.map((m) => Object.entries(m).find(([k]) => /bytes/.test(k) && !/max|limit|budget|capacity/.test(k))?.[1] ?? null)).filter((v) => v !== null);
  console.log(`| state cache | last turn prompt tokens | of them from the cache | last turn TTFT ms (median of ${repeats}) | all turns' TTFT ms (first run) |`);
  console.log('|---|---:|---:|---:|---|');
  const row = (name, r, t) => `| ${name} | ${last(r[0]).prompt_tokens} | ${last(r[0]).cached_prompt_tokens} | ${t} | ${r[0].per_turn.map((x) => x.ttft_ms).join(' ')} |`;
  console.log(row(`--state-cache-mb ${cacheMb}`, on, onT));
  console.log(row('--state-cache-mb 0', off, offT));
  console.log(`state cache: last turn's TTFT ${(offT / onT).toFixed(1)}x shorter with the cache (target >= 10x)`);
  const maxBytes = bytes.length ? Math.max(...bytes) : null;
  console.log(`cache memory (from /metrics): at most ${maxBytes} bytes (${maxBytes === null ? '?' : (maxBytes / 1048576).toFixed(2)} MiB) against --state-cache-mb ${cacheMb}: ${maxBytes !== null && maxBytes <= cacheMb * 1048576 ? 'within' : 'NOT within / unknown'}`);
  console.log('cache metrics after the last run:', JSON.stringify(on.at(-1).metrics_after));
}
EOF
