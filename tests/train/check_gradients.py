"""Checks aviary's RWKV-7 training gradients against PyTorch autograd.

Builds a random tiny RWKV-7 (random weights at working scales, so that every term of the model
carries gradient; not the official initialisation, whose zero matrices would hide terms), a
random batch of tokens and targets and a random non-zero initial state; saves the model as an
fp32 .pth with BlinkDL's names and shapes, then runs the tool under test:

  TOOL --model M.pth --inputs in.i32 --targets tg.i32 --batch B --ctx T [--chunks K]
       [--state STATE.f32] --out DIR

in.i32 / tg.i32: raw little-endian int32, B*T values, row-major (b, t). STATE.f32: the initial
state, per sequence b, per layer l: att_x (C floats), wkv (H*N*N: head, value row i, key column
j), ffn_x (C). With K chunks the tool runs the sequence as K consecutive chunks of T/K tokens,
carrying the state forward and its gradient back. DIR must then hold loss.txt (the mean
cross-entropy over the B*T tokens, as text), '<name>.grad.f32' for every parameter (float32 in
the .pth's shape, row-major), state_in.grad.f32 (d loss / d initial state, flat layout as
above), state_out.f32 (the final state) and logits.f32 (B*T*V float32). The gradient includes
RWKV-LM's L2Wrap term (1e-4 / (B T) times each position's largest logit, at that logit).

The reference runs this script's independent PyTorch model (rwkv7_torch.py) in float64 on the
same fp32 weights, so the differences measured are aviary's fp32 error. Cases: K = 1 and K = 2
from the random state, and K = 1 with no --state (zero state). For every tensor the table gives
the max abs error, `rel` = max|a - b| / max|b| (the error against the tensor's scale: the gate,
--tol) and `elem` = max over elements of |a - b| / (|b| + 0.01 max|b|) (elementwise, floored at
1% of the scale: the gate, --elem-tol). A tensor whose reference is exactly zero (layer 0's
unused v0/v1/v2) must come back exactly zero. Exit status 1 when anything fails.

  /usr/bin/python3 tests/train/check_gradients.py --tool build/aviary-train-grad-tool
  (--tool takes a command line: "/usr/bin/python3 fake_tool.py" works too)
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rwkv7_torch as R  # noqa: E402


def reference(params32, tokens, targets, state_flat, chunks, l2wrap=True):
  """float64 autograd on the fp32 values: loss, logits, final state, grads by name, state grad."""
  params = {n: p.double().clone().requires_grad_(True) for n, p in params32.items()}
  cfg = R.Config(params)
  B, T = tokens.shape
  if state_flat is None:
    state_flat = torch.zeros(B, cfg.n_layer * cfg.state_floats_per_layer())
  s_in = state_flat.double().clone().requires_grad_(True)
  state = R.state_from_flat(s_in, cfg)
  pieces = []
  step = T // chunks
  for c in range(chunks):
    logits, state = R.forward(params, tokens[:, c * step:(c + 1) * step], state)
    pieces.append(logits)
  logits = torch.cat(pieces, dim=1)
  loss = R.loss_fn(logits, targets, l2wrap)
  loss.backward()
  grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
           for n, p in params.items()}
  return {
      "loss": loss.detach(),
      "logits": logits.detach(),
      "state_out": R.state_to_flat(state).detach(),
      "grads": grads,
      "state_in.grad": s_in.grad.detach(),
  }


def compare(a, b):
  a = np.asarray(a, dtype=np.float64).ravel()
  b = np.asarray(b, dtype=np.float64).ravel()
  diff = np.abs(a - b)
  scale = np.abs(b).max() if b.size else 0.0
  max_abs = diff.max() if diff.size else 0.0
  if scale == 0.0:
    return max_abs, (0.0 if max_abs == 0.0 else np.inf), (0.0 if max_abs == 0.0 else np.inf)
  return max_abs, max_abs / scale, (diff / (np.abs(b) + 0.01 * scale)).max()


def read_f32(path, count):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing")
  data = np.fromfile(path, dtype="<f4")
  if data.size != count:
    raise ValueError(f"{path}: {data.size} floats, expected {count}")
  return data


def run_case(args, label, tool, workdir, model_path, params32, tokens, targets, state, chunks):
  out = os.path.join(workdir, f"out_{label}")
  os.makedirs(out, exist_ok=True)
  B, T = tokens.shape
  cmd = tool + ["--model", model_path, "--inputs", os.path.join(workdir, "in.i32"),
                "--targets", os.path.join(workdir, "tg.i32"), "--batch", str(B), "--ctx", str(T),
                "--chunks", str(chunks), "--out", out]
  if state is not None:
    cmd += ["--state", os.path.join(workdir, "state.f32")]
  print(f"\n== {label}: {' '.join(shlex.quote(c) for c in cmd)}")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
  except OSError as e:
    print(f"FAIL: cannot run the tool: {e}")
    return False
  if proc.returncode != 0:
    print(proc.stdout + proc.stderr)
    print(f"FAIL: the tool exited with status {proc.returncode}")
    return False

  ref = reference(params32, tokens, targets, state, chunks)
  cfg = R.Config(params32)
  rows = []  # (name, max_abs, rel, elem, tol, elem_tol, ok)

  def add(name, got, want, tol, elem_tol):
    max_abs, rel, elem = compare(got, want)
    ok = rel <= tol and elem <= elem_tol
    rows.append((name, max_abs, rel, elem, tol, elem_tol, ok))

  failures = []
  try:
    with open(os.path.join(out, "loss.txt")) as f:
      loss = float(f.read().split()[0])
    add("loss", [loss], [ref["loss"].item()], args.tol, args.elem_tol)
    V = cfg.vocab
    add("logits", read_f32(os.path.join(out, "logits.f32"), B * T * V), ref["logits"].numpy(),
        args.tol, args.elem_tol)
    n_state = B * cfg.n_layer * cfg.state_floats_per_layer()
    add("state_out", read_f32(os.path.join(out, "state_out.f32"), n_state),
        ref["state_out"].numpy(), args.tol, args.elem_tol)
    add("state_in.grad", read_f32(os.path.join(out, "state_in.grad.f32"), n_state),
        ref["state_in.grad"].numpy(), args.tol, args.elem_tol)
  except (OSError, ValueError) as e:
    failures.append(str(e))
  for name, want in ref["grads"].items():
    try:
      got = read_f32(os.path.join(out, f"{name}.grad.f32"), want.numel())
      add(f"{name}.grad", got, want.numpy(), args.tol, args.elem_tol)
    except (OSError, ValueError) as e:
      failures.append(str(e))

  width = max(len(r[0]) for r in rows) if rows else 10
  print(f"{'tensor':<{width}}  {'max abs err':>11}  {'rel':>9}  {'elem':>9}  "
        f"{'tol rel/elem':>15}")
  for name, max_abs, rel, elem, tol, elem_tol, ok in rows:
    print(f"{name:<{width}}  {max_abs:11.3e}  {rel:9.2e}  {elem:9.2e}  "
          f"{tol:7.0e}/{elem_tol:7.0e}{'' if ok else '  FAIL'}")
  worst = max(rows, key=lambda r: r[2]) if rows else None
  if worst:
    print(f"worst rel: {worst[0]} {worst[2]:.2e}; worst elem: "
          f"{max(rows, key=lambda r: r[3])[0]} {max(r[3] for r in rows):.2e}")
  for f in failures:
    print(f"FAIL: {f}")
  bad = [r[0] for r in rows if not r[6]]
  if bad:
    print(f"FAIL: {len(bad)} tensor(s) beyond tolerance: {', '.join(bad[:8])}"
          f"{' ...' if len(bad) > 8 else ''}")
  return not bad and not failures


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tool", required=True, help="the command under test (a shell-quoted line)")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--embd", type=int, default=128)
  ap.add_argument("--head-size", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--ctx", type=int, default=32)
  ap.add_argument("--seed", type=int, default=19)
  ap.add_argument("--tol", type=float, default=1e-4, help="max |a-b| / max |b| per tensor")
  ap.add_argument("--elem-tol", type=float, default=1e-3,
                  help="max |a-b| / (|b| + 0.01 max|b|) per tensor")
  ap.add_argument("--workdir", help="keep the files here (default: a temporary directory)")
  args = ap.parse_args()
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

  shapes = R.param_shapes(args.layers, args.embd, args.vocab, args.head_size)
  params32 = {n: p.float() for n, p in R.random_params(shapes, args.seed).items()}
  cfg = R.Config(params32)
  B, T = args.batch, args.ctx
  gen = torch.Generator().manual_seed(args.seed + 1)
  tokens = torch.randint(0, args.vocab, (B, T), generator=gen)
  targets = torch.randint(0, args.vocab, (B, T), generator=gen)
  # A state like one a run leaves: layer-norm outputs in the shifts, wkv entries of order 1.
  state = torch.randn(B, cfg.n_layer * cfg.state_floats_per_layer(), generator=gen)

  tmp = None
  if args.workdir:
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
  else:
    tmp = tempfile.TemporaryDirectory(prefix="aviary-grad-check-")
    workdir = tmp.name
  model_path = os.path.join(workdir, "model.pth")
  torch.save(params32, model_path)
  tokens.to(torch.int32).numpy().astype("<i4").tofile(os.path.join(workdir, "in.i32"))
  targets.to(torch.int32).numpy().astype("<i4").tofile(os.path.join(workdir, "tg.i32"))
  state.numpy().astype("<f4").tofile(os.path.join(workdir, "state.f32"))
  print(f"model: {cfg.n_layer} layers, C {cfg.n_embd}, H {cfg.n_head} x N {cfg.head_size}, "
        f"V {cfg.vocab}, F {cfg.n_ffn}; batch {B} x {T} tokens; files in {workdir}")

  # Self-checks of the reference: carrying the state over chunks changes nothing, and the
  # L2Wrap term moves the gradients by more than the tolerance (else this check could not see
  # a tool that leaves it out).
  one = reference(params32, tokens, targets, state, 1)
  two = reference(params32, tokens, targets, state, 2)
  split_err = max(compare(two["grads"][n].numpy(), one["grads"][n].numpy())[1]
                  for n in one["grads"] if one["grads"][n].abs().max() > 0)
  plain = reference(params32, tokens, targets, state, 1, l2wrap=False)
  l2_effect = compare(plain["grads"]["head.weight"].numpy(),
                      one["grads"]["head.weight"].numpy())[1]
  print(f"reference: 2 chunks vs 1, worst rel {split_err:.1e}; L2Wrap moves head.weight.grad by "
        f"{l2_effect:.1e} of its scale")
  ok = split_err < 1e-10 and l2_effect > 5 * args.tol
  if not ok:
    print("FAIL: the reference itself (chunking or L2Wrap sensitivity) is off")

  tool = shlex.split(args.tool)
  for label, chunks, st in (("K1", 1, state), ("K2", 2, state), ("K1-zero-state", 1, None)):
    if T % chunks:
      continue
    ok &= run_case(args, label, tool, workdir, model_path, params32, tokens, targets, st, chunks)
  print("\nPASS" if ok else "\nFAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
