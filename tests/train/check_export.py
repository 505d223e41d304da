"""Checks a .pth that aviary wrote (or any RWKV-7 .pth) against `aviary logits` on it.

Loads the file with torch.load (bf16 or fp32 tensors, BlinkDL's names and shapes), runs the
independent PyTorch RWKV-7 (rwkv7_torch.py) in float64 on the same token ids from a zero state,
and compares with the rows aviary wrote: the largest absolute difference over all rows must be
within --tol (1e-4). Exit status 0 on a match, 1 on a mismatch, 2 on bad input.

  AVIARY_ACTIVATIONS=f32 build/aviary logits --model OUT/model.pth --prompt-file p.txt \
      --output x.f32 --all-positions
  /usr/bin/python3 tests/train/check_export.py --pth OUT/model.pth --aviary-logits x.f32 \
      --tokens p.txt --vocab 256

--tokens: a file of little-endian int32 token ids when its name ends in .i32, else the prompt
file itself, whose bytes are the ids (byte vocabulary, V = 256). Run aviary with f32 activations:
other activation modes round the activations on purpose. The logits file may hold one row per
token (--all-positions) or only the last token's row.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rwkv7_torch as R  # noqa: E402


def fail_input(message):
  print(f"check_export: {message}", file=sys.stderr)
  sys.exit(2)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--pth", required=True)
  ap.add_argument("--aviary-logits", required=True, help="float32 rows from `aviary logits`")
  ap.add_argument("--tokens", required=True, help="FILE.i32 (int32 ids) or the prompt file")
  ap.add_argument("--vocab", type=int, required=True, help="row length of the logits file")
  ap.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed")
  args = ap.parse_args()

  try:
    raw = torch.load(args.pth, map_location="cpu")
  except Exception as e:  # torch raises many kinds for a bad file
    fail_input(f"{args.pth}: torch.load failed: {e}")
  if not isinstance(raw, dict):
    fail_input(f"{args.pth}: not a state dict")
  dtypes = sorted({str(t.dtype).replace("torch.", "") for t in raw.values()})
  params = {n: t.double() for n, t in raw.items()}
  try:
    cfg = R.Config(params)
  except (KeyError, ValueError) as e:
    fail_input(f"{args.pth}: not an RWKV-7 model: {e}")
  if cfg.vocab != args.vocab:
    fail_input(f"{args.pth}: vocabulary {cfg.vocab}, --vocab says {args.vocab}")

  if not os.path.exists(args.tokens):
    fail_input(f"{args.tokens}: missing")
  if args.tokens.endswith(".i32"):
    ids = np.fromfile(args.tokens, dtype="<i4").astype(np.int64)
  else:
    if cfg.vocab != 256:
      fail_input(f"{args.tokens}: a prompt file needs the byte vocabulary (V = 256), "
                 f"the model has {cfg.vocab}; give the ids as FILE.i32")
    ids = np.frombuffer(open(args.tokens, "rb").read(), dtype=np.uint8).astype(np.int64)
  if ids.size == 0:
    fail_input(f"{args.tokens}: no tokens")
  if ids.min() < 0 or ids.max() >= cfg.vocab:
    fail_input(f"{args.tokens}: token ids outside 0..{cfg.vocab - 1}")

  got = np.fromfile(args.aviary_logits, dtype="<f4")
  if got.size % args.vocab:
    fail_input(f"{args.aviary_logits}: {got.size} floats is not a whole number of rows of "
               f"{args.vocab}")
  got = got.reshape(-1, args.vocab)
  if got.shape[0] not in (1, ids.size):
    fail_input(f"{args.aviary_logits}: {got.shape[0]} rows for {ids.size} tokens")

  with torch.no_grad():
    logits, _ = R.forward(params, torch.from_numpy(ids).view(1, -1))
  want = logits[0, -got.shape[0]:].numpy()
  diff = np.abs(got.astype(np.float64) - want)
  worst = np.unravel_index(diff.argmax(), diff.shape)
  ok = diff.max() <= args.tol
  print(f"{args.pth}: {cfg.n_layer} layers, C {cfg.n_embd}, V {cfg.vocab}, {', '.join(dtypes)}; "
        f"{ids.size} tokens, {got.shape[0]} row(s) compared; max abs diff {diff.max():.3e} "
        f"(row {worst[0]}, id {worst[1]}; logits up to {np.abs(want).max():.2f}), "
        f"tolerance {args.tol:g}: {'OK' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
