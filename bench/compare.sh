#!/usr/bin/env bash
# Compares aviary with rwkv.cpp and llama.cpp, or with another aviary build, on the same
# synthetic models (aviary synth), run interleaved (engine A, B, C, A, B, C, ...), each run gated
# on a short compute probe that shows every core we use free. Prints one table: medians over
# rounds and ratios to aviary.
#
# This script never builds a peer. Point it at binaries you built yourself:
#   AVIARY_BIN       aviary (default: build/aviary)
#   AVIARY_BASE_BIN  a second aviary build (e.g. before a change), run as engine "aviary-base";
#                    it and aviary swap places every other round, so neither always runs first
#   RWKV_CPP_BIN     bench/rwkvcpp_bench.c compiled against rwkv.cpp (see the top of that file)
#   LLAMA_BENCH_BIN  llama.cpp's llama-bench (a build with RWKV-7 support)
#   WORLD_VOCAB      World vocabulary embedded in the GGUF files llama.cpp needs
#                    (default ../shared/tokenizers/rwkv_vocab_v20230424.txt)
# Options:
#   --version V         RWKV version of the models (default 7)
#   --sizes "LxC ..."   layers x embedding (default "12x768 24x1024" = RWKV-7 0.1B, 0.4B)
#   --types "T ..."     weight types (default "f16 q8_0 q5_1 q4_0"; q4_k, q5_k, q6_k run on
#                       GGUF only: aviary and llama.cpp)
#   --threads N         threads for every engine (default 2)
#   --rounds R          interleaved rounds (default 3)
#   --prompt N --gen N  tokens (default 512, 128)
#   --dir DIR           where the models are written and kept (default /tmp/aviary-compare)
#   --no-probe          skip the idle-core gate
# Each engine is run with its own repeat count 1 per round; the table shows the median of the
# rounds, and "busy" next to a number when the probe never saw idle cores before that run.
set -euo pipefail
cd "$(dirname "$0")/.."

version=7 sizes="12x768 24x1024" types="f16 q8_0 q5_1 q4_0" threads=2 rounds=3
prompt=512 gen=128 dir=/tmp/aviary-compare probe=1
while (($#)); do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --prompt) prompt=$2; shift 2 ;;
    --gen) gen=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --no-probe) probe=0; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

AVIARY_BIN=${AVIARY_BIN:-}
if [[ -z $AVIARY_BIN ]]; then
  for b in build/aviary; do [[ -x $b ]] && AVIARY_BIN=$b && break; done
fi
[[ -x ${AVIARY_BIN:-} ]] || { echo "compare.sh: no aviary binary (set AVIARY_BIN)" >&2; exit 2; }
AVIARY_BASE_BIN=${AVIARY_BASE_BIN:-}
RWKV_CPP_BIN=${RWKV_CPP_BIN:-}
LLAMA_BENCH_BIN=${LLAMA_BENCH_BIN:-}
WORLD_VOCAB=${WORLD_VOCAB:-../shared/tokenizers/rwkv_vocab_v20230424.txt}
engines=(aviary)
[[ -n $AVIARY_BASE_BIN ]] && { [[ -x $AVIARY_BASE_BIN ]] || { echo "AVIARY_BASE_BIN=$AVIARY_BASE_BIN is not executable" >&2; exit 2; }; engines+=(aviary-base); }
[[ -n $RWKV_CPP_BIN ]] && { [[ -x $RWKV_CPP_BIN ]] || { echo "RWKV_CPP_BIN=$RWKV_CPP_BIN is not executable" >&2; exit 2; }; engines+=(rwkv.cpp); }
[[ -n $LLAMA_BENCH_BIN ]] && { [[ -x $LLAMA_BENCH_BIN ]] || { echo "LLAMA_BENCH_BIN=$LLAMA_BENCH_BIN is not executable" >&2; exit 2; }; engines+=(llama.cpp); }
mkdir -p "$dir"
results=$dir/results.tsv
: >"$results"

# ---- the idle-core gate ----
# One fixed awk loop per core, run together; when the slowest copy takes at most 1.25x the
# best such parallel probe seen, nothing else is competing for the cores.
probe_once() {  # prints the slowest of $threads parallel copies, in ms
  local pids=() t0 files=()
  for ((i = 0; i < threads; i++)); do
    files+=("$dir/probe.$i")
    ( s=$(date +%s%N); awk 'BEGIN { for (i = 0; i < 2000000; i++) s += i * 0.5 }'; e=$(date +%s%N)
      echo $(((e - s) / 1000000)) >"$dir/probe.$i" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  local worst=0 v
  for f in "${files[@]}"; do v=$(<"$f"); ((v > worst)) && worst=$v; done
  echo "$worst"
}
best_probe=
calibrate() {  # the best of 5 parallel probes: what "idle" looks like on this machine
  local v
  for _ in 1 2 3 4 5; do
    v=$(probe_once)
    if [[ -z $best_probe || $v -lt $best_probe ]]; then best_probe=$v; fi
  done
}
wait_idle() {  # returns 0 when idle was seen, 1 after giving up (90 s)
  ((probe)) || return 0
  local deadline=$((SECONDS + 90)) v
  while ((SECONDS < deadline)); do
    v=$(probe_once)
    ((v < best_probe)) && best_probe=$v
    if ((v * 100 <= best_probe * 125)); then return 0; fi
    sleep 1
  done
  return 1
}

json_field() {  # json_field KEY < json  (first number after "KEY":)
  python3 -c 'import json,sys
d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(d[sys.argv[1]])' "$1"
}

run_engine() {  # run_engine ENGINE BIN_MODEL GGUF_MODEL -> "pp tg"
  local engine=$1 bin=$2 gguf=$3 out exe=$AVIARY_BIN
  case "$engine" in
    aviary|aviary-base)
      [[ $engine == aviary-base ]] && exe=$AVIARY_BASE_BIN
      out=$("$exe" bench --model "$bin" --threads "$threads" --prompt-tokens "$prompt" \
            --gen-tokens "$gen" --repeat 1 --json)
      echo "$(json_field prompt_tok_s <<<"$out") $(json_field gen_tok_s <<<"$out") $(json_field weight_bytes_per_token <<<"$out")" ;;
    rwkv.cpp)
      out=$("$RWKV_CPP_BIN" "$bin" "$threads" "$prompt" "$gen" 1 2>/dev/null | tail -1)
      echo "$(json_field prompt_tok_s <<<"$out") $(json_field gen_tok_s <<<"$out")" ;;
    llama.cpp)
      out=$("$LLAMA_BENCH_BIN" -m "$gguf" -t "$threads" -p "$prompt" -n "$gen" -r 1 -o json 2>/dev/null)
      python3 -c 'import json,sys
rows=json.load(sys.stdin); pp=[r["avg_ts"] for r in rows if r.get("n_prompt",0)>0 and r.get("n_gen",0)==0]
tg=[r["avg_ts"] for r in rows if r.get("n_gen",0)>0 and r.get("n_prompt",0)==0]
print(pp[0] if pp else "nan", tg[0] if tg else "nan")' <<<"$out" ;;
  esac
}

calibrate
echo "# machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); probe best ${best_probe} ms; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "# engines: ${engines[*]}; threads $threads; prompt $prompt, gen $gen; rounds $rounds" >&2

for size in $sizes; do
  layers=${size%x*} embd=${size#*x}
  for type in $types; do
    bin=$dir/rwkv${version}-${layers}x${embd}-${type}.bin gguf=${bin%.bin}.gguf
    kquant=0
    [[ ${type,,} == *_k ]] && kquant=1
    if ((kquant)); then
      # rwkv.cpp's .bin has no K-quants: quantize the F16 model while converting to GGUF, and
      # run aviary on that GGUF too (rwkv.cpp sits these out).
      src=$dir/rwkv${version}-${layers}x${embd}-f16.bin
      if [[ ! -s $src ]]; then
        "$AVIARY_BIN" synth --version "$version" --layers "$layers" --embd "$embd" --type f16 -o "$src" >&2
      fi
      if [[ ! -s $gguf ]]; then
        "$AVIARY_BIN" convert "$src" "$gguf" --type "$type" --tokenizer "$WORLD_VOCAB" >&2
      fi
      bin=$gguf
    fi
    if [[ ! -s $bin ]]; then
      "$AVIARY_BIN" synth --version "$version" --layers "$layers" --embd "$embd" --type "$type" -o "$bin" >&2
    fi
    if [[ " ${engines[*]} " == *" llama.cpp "* && ! -s $gguf ]]; then
      "$AVIARY_BIN" convert "$bin" "$gguf" --tokenizer "$WORLD_VOCAB" >&2
    fi
    for ((round = 1; round <= rounds; round++)); do
      order=("${engines[@]}")
      if [[ ${order[1]:-} == aviary-base ]] && ((round % 2 == 0)); then
        order[0]=aviary-base order[1]=aviary
      fi
      for engine in "${order[@]}"; do
        [[ $engine == rwkv.cpp ]] && ((kquant)) && continue
        busy=0
        wait_idle || busy=1
        bw=nan bytes=nan
        if [[ $engine == aviary ]]; then
          # Read bandwidth measured right before, in the same conditions: the bound on generation
          # is bandwidth / weight bytes read per token.
          bw=$("$AVIARY_BIN" bench --bandwidth --threads "$threads" --json | json_field read_bandwidth_gb_s)
        fi
        read -r pp tg bytes < <(run_engine "$engine" "$bin" "$gguf" || echo "nan nan nan")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${layers}x${embd}" "$type" "$engine" "$round" "$pp" "$tg" "$busy" "$bw" "${bytes:-nan}" >>"$results"
        echo "  ${layers}x${embd} $type round $round $engine: pp $pp tok/s, tg $tg tok/s$([[ $busy == 1 ]] && echo ' (busy)')" >&2
      done
    done
  done
done

python3 - "$results" "${engines[@]}" <<'EOF'
import statistics, sys
from collections import defaultdict
path, engines = sys.argv[1], sys.argv[2:]
data = defaultdict(lambda: {"pp": [], "tg": [], "busy": 0})
order = []
for line in open(path):
    size, typ, engine, rnd, pp, tg, busy, bw, nbytes = line.rstrip("\n").split("\t")
    key = (size, typ)
    if key not in order: order.append(key)
    d = data[key + (engine,)]
    if engine == "aviary" and bw != "nan" and nbytes != "nan":
        d.setdefault("bound", []).append(float(bw) * 1e9 / float(nbytes))
    for name, v in (("pp", pp), ("tg", tg)):
        try:
            f = float(v)
            if f == f: d[name].append(f)
        except ValueError:
            pass
    d["busy"] += int(busy)
def med(v): return statistics.median(v) if v else float("nan")
head = ["model", "type"]
for e in engines:
    head += [f"{e} pp", f"{e} tg"]
    if e == "aviary": head += ["tg bound", "tg % of bound"]
    if e != "aviary": head += [f"pp aviary/{e}", f"tg aviary/{e}"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for key in order:
    a = data[key + ("aviary",)]
    row = [key[0], key[1]]
    for e in engines:
        d = data[key + (e,)]
        mark = " (busy)" if d["busy"] else ""
        row += [f"{med(d['pp']):.1f}{mark}", f"{med(d['tg']):.2f}{mark}"]
        if e == "aviary":
            bound = med(d.get("bound", []))
            row += [f"{bound:.2f}", f"{100 * med(d['tg']) / bound:.0f}%"]
        if e != "aviary":
            row += [f"{med(a['pp']) / med(d['pp']):.2f}", f"{med(a['tg']) / med(d['tg']):.2f}"]
    print("| " + " | ".join(row) + " |")
print("\npp = prompt processing tok/s (sequence mode), tg = generation tok/s (one token at a time);"
      " medians over rounds; aviary/peer > 1 means aviary is faster; tg bound = read bandwidth"
      " (measured before each aviary run) / weight bytes read per token.")
if "aviary-base" in engines:
    print("aviary-base = AVIARY_BASE_BIN, aviary = AVIARY_BIN: aviary/aviary-base > 1 means AVIARY_BIN"
          " is faster.")
EOF
