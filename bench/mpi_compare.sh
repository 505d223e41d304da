#!/usr/bin/env bash
# Data-parallel training against one process: the Tiny Shakespeare recipe's shape (4 x 128,
# windows of 64, 12 windows a step) trained for STEPS steps as one process with THREADS threads
# and under `mpirun -np 2` with THREADS / 2 threads each (6 windows a process, the same global
# batch). Prints the largest difference between the two loss curves, each run's training
# tokens/s and the share of the 2-process steps spent in the gradients' all-reduce (comm_s in
# the log), and draws both curves into one PNG.
#
#   bench/mpi_compare.sh [OUT_DIR] [PNG]     (env: STEPS=300 THREADS=2 AVIARY=build/aviary)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/tmp/aviary-mpi-compare}
png=${2:-$here/docs/images/mpi-loss.png}
steps=${STEPS:-300}
threads=${THREADS:-2}
aviary=${AVIARY:-$here/build/aviary}
data=${DATA:-$here/../shared/data/tinyshakespeare.txt}
rm -rf "$out"
mkdir -p "$out"
base=(train --data "$data" --tokenizer bytes --layers 4 --embd 128 --ctx-len 64 --batch 12
  --lr 2e-3 --lr-final 1e-4 --warmup 50 --eval-windows 500 --save-every 0)
args=("${base[@]}" --steps "$steps" --eval-every 100)
# As root (containers), mpirun needs to be told that is intended.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$aviary" "${args[@]}" --threads "$threads" --out "$out/np1" 2> "$out/np1.err"
mpirun -np 2 --oversubscribe --bind-to none --mca btl self,vader \
  --mca btl_vader_single_copy_mechanism none \
  "$aviary" "${args[@]}" --threads $((threads > 1 ? threads / 2 : 1)) --out "$out/np2" \
  2> "$out/np2.err"

python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
def read(name):
    return [json.loads(l) for l in open(f"{out}/{name}/log.jsonl")]
a, b = read("np1"), read("np2")
steps = [(x, y) for x, y in zip(a, b) if "loss" in x]
d = max(abs(x["loss"] - y["loss"]) for x, y in steps)
rel = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in steps)
vals = [(x["step"], x["val_loss"], y["val_loss"]) for x, y in zip(a, b) if "val_loss" in x]
dv = max(abs(v1 - v2) for _, v1, v2 in vals)
with open(f"{out}/curves.dat", "w") as f:
    for x, y in steps:
        f.write(f'{x["step"]} {x["loss"]} {y["loss"]} {y["loss"] - x["loss"]}\n')
print(f"steps: {len(steps)}")
print(f"training loss: max |np2 - np1| = {d:.3g} (relative {rel:.3g}); last {steps[-1][0]['loss']:.6f} vs {steps[-1][1]['loss']:.6f}")
print(f"validation loss: max |np2 - np1| = {dv:.3g}; " + ", ".join(f"step {s}: {v1:.6f} vs {v2:.6f}" for s, v1, v2 in vals))
ta, tb = a[-1]["tokens_per_s"], b[-1]["tokens_per_s"]
train_s = b[-1]["tokens"] / tb
comm = sum(y.get("comm_s", 0) for y in b if "loss" in y)
print(f"tokens/s: np1 {ta:.0f}, np2 {tb:.0f} ({tb / ta:.2f}x)")
print(f"np2: all-reduce (comm_s) {comm:.2f} s of {train_s:.2f} s of training steps = {100 * comm / train_s:.1f}%")
EOF

# Speed on a host shared with other work is noisy: short runs of both kinds, alternating, and
# the medians of their training tokens/s and all-reduce shares.
rounds=${SPEED_ROUNDS:-5}
for ((i = 0; i < rounds; ++i)); do
  rm -rf "$out/s1" "$out/s2"
  "$aviary" "${base[@]}" --steps 60 --eval-every 0 --threads "$threads" \
    --out "$out/s1" > /dev/null 2>&1 || true
  mpirun -np 2 --oversubscribe --bind-to none --mca btl self,vader \
    --mca btl_vader_single_copy_mechanism none \
    "$aviary" "${base[@]}" --steps 60 --eval-every 0 --threads $((threads > 1 ? threads / 2 : 1)) \
    --out "$out/s2" > /dev/null 2>&1
  python3 - "$out" >> "$out/speed.txt" <<'EOF2'
import json, sys
def last(d):
    lines = [json.loads(l) for l in open(f"{sys.argv[1]}/{d}/log.jsonl") if '"loss"' in l]
    train = lines[-1]["tokens"] / lines[-1]["tokens_per_s"]
    return lines[-1]["tokens_per_s"], sum(x.get("comm_s", 0) for x in lines) / train
(a, _), (b, c) = last("s1"), last("s2")
print(a, b, c)
EOF2
done
python3 - "$out/speed.txt" <<'EOF2'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
a, b, c = (statistics.median(r[i] for r in rows) for i in range(3))
print(f"speed, medians of {len(rows)} alternating rounds of 60 steps: np1 {a:.0f} tokens/s, "
      f"np2 {b:.0f} tokens/s ({b / a:.2f}x), all-reduce share of np2's steps {100 * c:.1f}% "
      f"(rounds: " + "; ".join(f"{r[0]:.0f}/{r[1]:.0f}/{100 * r[2]:.0f}%" for r in rows) + ")")
EOF2

gnuplot <<EOF
set terminal pngcairo size 1000,600 font 'sans,11'
set output '$png'
set title 'Tiny Shakespeare shape (4 x 128, windows of 64, batch 12): one process vs two (6 windows each)'
set xlabel 'step'
set ylabel 'training loss (nats per token)'
set y2label '|two - one|'
set y2tics
set ytics nomirror
set logscale y2
set grid
set key top right
plot '$out/curves.dat' using 1:2 with lines lw 3 lc rgb '#a6bddb' title 'one process (batch 12)', \
     '$out/curves.dat' using 1:3 with lines lw 1 lc rgb '#d95f0e' title 'mpirun -np 2 (6 + 6)', \
     '$out/curves.dat' using 1:(abs(\$4) > 0 ? abs(\$4) : 1/0) axes x1y2 with points pt 7 ps 0.3 lc rgb '#555555' title '|difference| (right axis)'
EOF
echo "wrote $png"
