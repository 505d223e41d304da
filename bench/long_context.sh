#!/usr/bin/env bash
# Longer context by chunked training, end to end (docs/TRAINING.md#longer-context):
#   1. trains a 4 x 128 model on windows of 64 bytes of Tiny Shakespeare (the quick start run);
#   2. finetunes it on windows of --long bytes run in chunks of 64 (`--chunk-len 64`), and, as a
#      control, on windows of 64 for the same number of tokens and steps;
#   3. measures each model's loss by position (`aviary perplexity --window`) on the held-out
#      tail, from the initial state out to --window positions, and prints one table;
#   4. draws the three curves (PNG, gnuplot);
#   5. compares the peak resident memory of a few steps at windows of 512 and 4096 with the
#      same chunks, and prints what aviary says the two differ by (the chunk start states).
#
#   bench/long_context.sh [OUT_DIR]        (default: long-context/)
# Environment: AVIARY_BIN (default build/aviary), SHARED (default ../shared), THREADS (2),
# BASE_STEPS (2000), TUNE_STEPS (300), LONG (512), WINDOW (2048).
# A base run already in OUT_DIR/base is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
aviary=${AVIARY_BIN:-build/aviary}
shared=${SHARED:-../shared}
threads=${THREADS:-2}
base_steps=${BASE_STEPS:-2000}
tune_steps=${TUNE_STEPS:-300}
long=${LONG:-512}
window=${WINDOW:-2048}
out=${1:-long-context}
data=$shared/data/tinyshakespeare.txt
command -v gnuplot >/dev/null || { echo "needs gnuplot (Debian: gnuplot-nox)" >&2; exit 1; }
mkdir -p "$out"

# The held-out tail: the runs keep the last 10% of the bytes for validation; take a little less.
size=$(stat -c %s "$data")
tail -c $((size / 10 - 64)) "$data" >"$out/heldout.txt"

common=(--data "$data" --tokenizer bytes --threads "$threads")
if [[ ! -f $out/base/model.pth ]]; then
  rm -rf "$out/base"
  echo "== base: windows of 64, $base_steps steps"
  "$aviary" train "${common[@]}" --layers 4 --embd 128 --ctx-len 64 --batch 12 \
    --steps "$base_steps" --lr 2e-3 --lr-final 1e-4 --warmup 50 --eval-every 500 --eval-windows 2000 \
    --out "$out/base" >"$out/base.log" 2>&1
fi

# Both finetunes see tune_steps x 2048 tokens at the same learning rates.
tune=(--init "$out/base/model.pth" --steps "$tune_steps" --lr 5e-4 --lr-final 1e-5 --warmup 10
  --eval-every 100 --eval-windows 200)
for run in long control; do
  rm -rf "${out:?}/$run"
done
echo "== finetune: windows of $long in chunks of 64, $tune_steps steps"
"$aviary" train "${common[@]}" "${tune[@]}" --ctx-len "$long" --chunk-len 64 \
  --batch $((2048 / long)) --out "$out/long" >"$out/long.log" 2>&1
echo "== control: windows of 64, $tune_steps steps"
"$aviary" train "${common[@]}" "${tune[@]}" --ctx-len 64 --batch 32 --out "$out/control" \
  >"$out/control.log" 2>&1

for run in base control long; do
  "$aviary" perplexity --model "$out/$run/model.gguf" --text "$out/heldout.txt" \
    --window "$window" --bucket 64 --positions-out "$out/$run.tsv" --threads "$threads" \
    >"$out/$run.positions.txt"
done

echo
echo "Loss by position (nats/byte, mean over the held-out windows of $window, each from the"
echo "initial state); base: trained on windows of 64; control: + $tune_steps steps at 64;"
echo "long: + $tune_steps steps at $long in chunks of 64"
echo
printf "| positions | base | control | long |\n|---|---:|---:|---:|\n"
paste <(awk '/^[0-9]+-[0-9]+ /' "$out/base.positions.txt") \
  <(awk '/^[0-9]+-[0-9]+ /{print $2}' "$out/control.positions.txt") \
  <(awk '/^[0-9]+-[0-9]+ /{print $2}' "$out/long.positions.txt") |
  awk -v w="$window" '{split($1, r, "-"); p = r[1]
    if (p < 128 || p == 192 || p == 256 || p == 384 || p == 448 || p == 512 || p == 576 ||
        p == 768 || p == 1024 || p == 1536 || p + 64 >= w)
      printf "| %s | %.3f | %.3f | %.3f |\n", $1, $2, $3, $4}'
for run in base control long; do
  printf "%s: mean over all positions %s\n" "$run" \
    "$(awk '/^average loss/{print $3}' "$out/$run.positions.txt")"
done

# Mean of 32 positions per point, so the curve shows the trend under per-position noise.
for run in base control long; do
  awk '!/^#/{s += $2; n++; if (n == 32) {print $1 - 15.5, s / n; s = 0; n = 0}}' \
    "$out/$run.tsv" >"$out/$run.smooth"
done
(cd "$out" && gnuplot <<EOF
set terminal pngcairo size 1000,600 font 'sans,11'
set output 'long-context-loss.png'
set title 'loss by position on held-out Tiny Shakespeare (mean of 32 positions)'
set xlabel 'position in the window (bytes since the initial state)'
set ylabel 'loss (nats per byte)'
set grid
set key top right
set xrange [0:$window]
set arrow from 64, graph 0 to 64, graph 1 nohead dt 2 lc rgb '#888888'
set arrow from $long, graph 0 to $long, graph 1 nohead dt 2 lc rgb '#888888'
set label 'trained at 64' at 70, graph 0.95
set label 'finetuned at $long' at $long + 6, graph 0.95
plot 'base.smooth' with lines lw 2 lc rgb '#d95f0e' title 'base (windows of 64)', \
     'control.smooth' with lines lw 2 lc rgb '#a6bddb' title '+ $tune_steps steps at 64', \
     'long.smooth' with lines lw 2 lc rgb '#045a8d' title '+ $tune_steps steps at $long, chunks of 64'
EOF
)
echo "wrote $out/long-context-loss.png"

echo
echo "== peak memory, windows of 512 and 4096, chunks of 64, batch 1 (3 steps each)"
for ctx in 512 4096; do
  rm -rf "${out:?}/mem$ctx"
  /usr/bin/time -f "%M" -o "$out/mem$ctx.rss" "$aviary" train "${common[@]}" \
    --init "$out/long/model.pth" --ctx-len "$ctx" --chunk-len 64 --batch 1 --steps 3 \
    --eval-windows 1 --out "$out/mem$ctx" >"$out/mem$ctx.log" 2>&1
  printf "ctx %5s: peak RSS %s KiB; %s\n" "$ctx" "$(cat "$out/mem$ctx.rss")" \
    "$(grep '^memory:' "$out/mem$ctx.log")"
done
