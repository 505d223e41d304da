#!/usr/bin/env bash
# Training speed side by side: the same RWKV-7 shapes, batch, window and data (byte-level Tiny
# Shakespeare) trained by `aviary train` and by PyTorch (bench/train_torch.py: fp32, its WKV a
# Python loop over time steps like RWKV-LM's CUDA-free path, AdamW, OpenBLAS), same thread
# count, run interleaved (aviary, PyTorch, aviary, PyTorch, ...). Prints one table: median
# training tokens/s of each (steps after the first), their ratio, and aviary's achieved FLOP/s
# (6 x parameters x tokens/s) against the machine's fp32 peak.
#
#   bench/train_compare.sh                         # both sizes of docs/PERFORMANCE.md
#   bench/train_compare.sh --sizes "4x128x64x12"   # LAYERSxEMBDxCTXxBATCH
# Options:
#   --sizes "..."   LxCxTxB configurations (default "4x128x64x12 12x768x512x1")
#   --steps N       steps per run (default 12; 6 for models of 512 wide and more)
#   --threads N     threads for both (default 2)
#   --rounds R      interleaved rounds (default 2); the table shows the median over rounds
#   --peak-gflops X the fp32 peak to compare with (default: threads x clock x FMA lanes x 2 FMA
#                   units x 2; the clock from lscpu or /proc/cpuinfo; AVX-512 16 lanes, AVX2 8)
# Needs Debian's python3-torch and, for a fair PyTorch, libopenblas0-pthread (its BLAS is
# reported in the output).
set -euo pipefail
cd "$(dirname "$0")/.."

sizes="4x128x64x12 12x768x512x1" steps="" threads=2 rounds=2 peak=""
while (($#)); do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --peak-gflops) peak=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
aviary=${AVIARY_BIN:-build/aviary}
data=${DATA:-../shared/data/tinyshakespeare.txt}
[[ -x $aviary ]] || { echo "build aviary first ($aviary)" >&2; exit 1; }
/usr/bin/python3 -c "import torch" 2>/dev/null || { echo "needs Debian's python3-torch" >&2; exit 1; }
if [[ -z $peak ]]; then
  # The clock: lscpu's maximum where it gives one, else the kernel's current "cpu MHz".
  mhz=$(lscpu | awk -F: '/CPU max MHz/ {gsub(/ /, "", $2); print $2}')
  [[ -n $mhz ]] || mhz=$(awk -F: '/cpu MHz/ {gsub(/ /, "", $2); print $2; exit}' /proc/cpuinfo)
  lanes=8
  grep -q avx512f /proc/cpuinfo && lanes=16
  peak=$(awk -v t="$threads" -v m="$mhz" -v l="$lanes" 'BEGIN {printf "%.1f", t * m / 1000 * l * 2 * 2}')
  peak_note="(${threads} cores x ${mhz} MHz x ${lanes} lanes x 2 FMA units x 2)"
fi
echo "fp32 peak: ${peak} GFLOP/s ${peak_note:-}"
tmp=$(mktemp -d /tmp/aviary-train-compare-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# Median per-step seconds of an aviary run, steps 2.. (from log.jsonl's elapsed times).
aviary_step_seconds() {
  /usr/bin/python3 - "$1" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
steps = [r for r in rows if "loss" in r]
dts = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:]) if "val_loss" not in b]
print(statistics.median(dts))
EOF
}

printf "%-22s %10s %12s %14s %8s %10s %8s\n" "model (LxC, T x B)" "params" "aviary tok/s" "pytorch tok/s" "ratio" "GFLOP/s" "of peak"
for size in $sizes; do
  IFS=x read -r L C T B <<<"$size"
  n=${steps:-$((C >= 512 ? 6 : 12))}
  av=() pt=() params=0
  for ((round = 0; round < rounds; ++round)); do
    dir=$tmp/run-$size-$round
    "$aviary" train --data "$data" --layers "$L" --embd "$C" --ctx-len "$T" --batch "$B" \
      --steps "$n" --threads "$threads" --eval-every 0 --eval-windows 1 --save-every 0 \
      --out "$dir" >"$dir.out" 2>&1 || { cat "$dir.out" >&2; exit 1; }
    s=$(aviary_step_seconds "$dir")
    av+=("$(awk -v s="$s" -v t="$T" -v b="$B" 'BEGIN {printf "%.1f", t * b / s}')")
    params=$(awk '/parameters/ {for (i = 1; i <= NF; ++i) if ($i ~ /M$/) {sub(/M/, "", $i); print $i * 1e6}}' "$dir.out" | head -1)
    rm -rf "$dir"
    /usr/bin/python3 bench/train_torch.py --layers "$L" --embd "$C" --ctx "$T" --batch "$B" \
      --steps "$n" --threads "$threads" --data "$data" >"$tmp/torch.out" 2>&1 ||
      { cat "$tmp/torch.out" >&2; exit 1; }
    pt+=("$(/usr/bin/python3 -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if '\"summary\"' in l][-1]['tokens_per_s'])" "$tmp/torch.out")")
    blas=$(/usr/bin/python3 -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if '\"summary\"' in l][-1]['blas'])" "$tmp/torch.out")
  done
  med() { printf "%s\n" "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
  a=$(med "${av[@]}") p=$(med "${pt[@]}")
  awk -v name="${L}x${C}, ${T} x ${B}" -v n="$params" -v a="$a" -v p="$p" -v peak="$peak" 'BEGIN {
    g = 6 * n * a / 1e9
    printf "%-22s %9.2fM %12.1f %14.1f %7.2fx %10.1f %7.1f%%\n", name, n / 1e6, a, p, a / p, g, 100 * g / peak
  }'
done
echo "PyTorch BLAS: ${blas:-?}; rounds: $rounds; threads: $threads"
