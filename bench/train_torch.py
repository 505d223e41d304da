"""The PyTorch side of the training speed comparison: RWKV-7 trained by a plain, reasonable
PyTorch loop on the same CPU, to set against `aviary train` at the same sizes and thread count.

The model is tests/train/rwkv7_torch.py (fp32; every op batched except the WKV recurrence, a
Python loop over time steps like RWKV-LM's CUDA-free path), initialised with RWKV-LM's scales
(deterministic by --seed), trained with AdamW as RWKV-LM configures it (betas 0.9/0.99, eps 1e-18,
weight decay on the 2-D .weight matrices only, att.w0 at twice the learning rate), gradient
clipping at 1.0, on random windows of byte-level Tiny Shakespeare (first 90%). It prints one JSON
line per step and a summary line: median tokens/s over the steps after the first (warm-up), the
BLAS library the process really loaded (PyTorch's build reports a "generic" BLAS: Debian's
libblas.so.3 alternative decides), peak RSS.

  /usr/bin/python3 bench/train_torch.py --layers 4 --embd 128 --ctx 64 --batch 12 --steps 30 \
      --threads 2
  /usr/bin/python3 bench/train_torch.py --layers 12 --embd 768 --ctx 512 --batch 2 --steps 4 \
      --threads 2

--threads sets both PyTorch's intra-op (OpenMP) threads and OpenBLAS's pthreads (which PyTorch
does not control when it was built against the generic BLAS interface, as Debian's is); idle
OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning against the BLAS threads.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--embd", type=int, default=128)
  ap.add_argument("--ffn", type=int, default=0, help="channel-mix width (default 4 C)")
  ap.add_argument("--ctx", type=int, default=64)
  ap.add_argument("--batch", type=int, default=12)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--lr", type=float, default=6e-4)
  ap.add_argument("--weight-decay", type=float, default=0.001)
  ap.add_argument("--seed", type=int, default=42)
  ap.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "..", "..", "shared", "data",
                                                 "tinyshakespeare.txt"))
  return ap.parse_args()


args = parse_args()
# Before torch loads: OpenBLAS and libgomp read these once, at load time. PyTorch's OpenMP
# threads and OpenBLAS's own pthreads take turns on the same cores; spinning OpenMP workers
# would starve the BLAS threads, so they sleep when idle.
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "train"))
import rwkv7_torch as R  # noqa: E402


def official_init(n_layer, C, vocab, head_size, n_ffn):
  """RWKV-LM's x070 initial values (model.py's __init__ and generate_init_weight)."""
  shapes = R.param_shapes(n_layer, C, vocab, head_size, n_ffn)
  p = {}
  H, N = C // head_size, head_size

  def ortho(shape, gain):
    t = torch.empty(shape)
    torch.nn.init.orthogonal_(t, gain=gain)
    return t

  for l in range(n_layer):
    r01 = l / (n_layer - 1) if n_layer > 1 else 0.0
    r10 = 1.0 - l / n_layer
    ddd = torch.arange(C, dtype=torch.float32) / C
    n = torch.arange(C, dtype=torch.float32)
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * r01 ** 0.3)
    a = f"blocks.{l}.att"
    for m, e in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9),
                 ("x_g", 0.2)):
      p[f"{a}.{m}"] = 1.0 - ddd ** (e * r10)
    p[f"{a}.w0"] = www + 0.5 + zigzag * 2.5
    p[f"{a}.a0"] = -0.19 + zigzag * 0.3 + linear * 0.4
    p[f"{a}.v0"] = 0.73 - linear * 0.4
    for name in ("w", "a", "v", "g"):
      D = shapes[f"{a}.{name}1"][1]
      gain = math.sqrt(D / C) if D > C else 1.0
      p[f"{a}.{name}1"] = torch.zeros(C, D)
      p[f"{a}.{name}2"] = ortho((D, C), gain * 0.1)
    p[f"{a}.k_k"] = 0.71 - linear * 0.1
    p[f"{a}.k_a"] = torch.full((C,), 1.02)
    p[f"{a}.r_k"] = torch.full((H, N), -0.04)
    p[f"{a}.receptance.weight"] = ortho((C, C), 1.0)
    p[f"{a}.key.weight"] = ortho((C, C), 0.1)
    p[f"{a}.value.weight"] = ortho((C, C), 1.0)
    p[f"{a}.output.weight"] = torch.zeros(C, C)
    p[f"{a}.ln_x.weight"] = torch.full((C,), ((1 + l) / n_layer) ** 0.7)
    p[f"{a}.ln_x.bias"] = torch.zeros(C)
    f = f"blocks.{l}.ffn"
    p[f"{f}.x_k"] = 1.0 - ddd ** (r10 ** 4)
    p[f"{f}.key.weight"] = ortho(shapes[f"{f}.key.weight"], 1.0)
    p[f"{f}.value.weight"] = torch.zeros(shapes[f"{f}.value.weight"])
    for ln in ("ln1", "ln2") + (("ln0",) if l == 0 else ()):
      p[f"blocks.{l}.{ln}.weight"] = torch.ones(C)
      p[f"blocks.{l}.{ln}.bias"] = torch.zeros(C)
  p["emb.weight"] = torch.empty(vocab, C).uniform_(-1e-4, 1e-4)
  p["ln_out.weight"] = torch.ones(C)
  p["ln_out.bias"] = torch.zeros(C)
  p["head.weight"] = ortho((vocab, C), 0.5 * math.sqrt(vocab / C) if vocab > C else 0.5)
  return {name: p[name].reshape(shape).contiguous().requires_grad_(True)
          for name, shape in shapes.items()}


def loaded_blas():
  """The BLAS and LAPACK libraries mapped into this process (after a matmul ran), resolved."""
  libs = set()
  with open("/proc/self/maps") as f:
    for line in f:
      path = line.split()[-1] if "/" in line else ""
      base = os.path.basename(path)
      if any(k in base for k in ("blas", "lapack", "mkl", "dnnl")):
        libs.add(os.path.realpath(path))
  info = {"libraries": sorted(libs)}
  try:
    import ctypes
    ob = next((l for l in libs if "libopenblas" in l), None)
    if ob:
      lib = ctypes.CDLL(ob)
      lib.openblas_get_config.restype = ctypes.c_char_p
      lib.openblas_get_corename.restype = ctypes.c_char_p
      info["openblas"] = lib.openblas_get_config().decode()
      info["openblas_core"] = lib.openblas_get_corename().decode()
      info["openblas_threads"] = lib.openblas_get_num_threads()
  except (OSError, AttributeError):
    pass
  return info


def sgemm_gflops(n=768, k=768, m=1024, reps=20):
  """fp32 matmul speed through torch at a training-like shape (tokens x C times C x C)."""
  a, b = torch.randn(m, k), torch.randn(k, n)
  a @ b
  t = time.perf_counter()
  for _ in range(reps):
    a @ b
  return 2.0 * m * n * k * reps / (time.perf_counter() - t) / 1e9


def rss_mib():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def main():
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  head_size = 64 if args.embd >= 64 else args.embd
  vocab = 256
  params = official_init(args.layers, args.embd, vocab, head_size, args.ffn or 4 * args.embd)
  n_params = sum(p.numel() for p in params.values())

  decay, one_x, two_x = [], [], []
  for name, p in params.items():
    if "att.w0" in name:
      two_x.append(p)
    elif p.squeeze().dim() >= 2 and args.weight_decay > 0 and ".weight" in name:
      decay.append(p)
    else:
      one_x.append(p)
  opt = torch.optim.AdamW(
      [{"params": one_x, "weight_decay": 0.0, "lr": args.lr},
       {"params": two_x, "weight_decay": 0.0, "lr": 2 * args.lr},
       {"params": decay, "weight_decay": args.weight_decay, "lr": args.lr}],
      lr=args.lr, betas=(0.9, 0.99), eps=1e-18)

  data = np.frombuffer(open(args.data, "rb").read(), dtype=np.uint8)
  train = torch.from_numpy(data[: int(len(data) * 0.9)].astype(np.int64))
  gen = torch.Generator().manual_seed(args.seed)
  B, T = args.batch, args.ctx

  gflops = sgemm_gflops()
  blas = loaded_blas()
  times, losses = [], []
  for step in range(args.steps):
    starts = torch.randint(0, len(train) - T - 1, (B,), generator=gen)
    window = torch.stack([train[s:s + T + 1] for s in starts.tolist()])
    t0 = time.perf_counter()
    logits, _ = R.forward(params, window[:, :-1])
    loss = R.loss_fn(logits, window[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    dt = time.perf_counter() - t0
    del logits
    times.append(dt)
    losses.append(loss.item())
    print(json.dumps({"step": step, "loss": round(losses[-1], 4), "seconds": round(dt, 4),
                      "tokens_per_s": round(B * T / dt, 1), "rss_mib": round(rss_mib(), 1)}),
          flush=True)

  timed = times[1:] if len(times) > 1 else times
  median = statistics.median(timed)
  tok_s = B * T / median
  print(json.dumps({
      "summary": "pytorch", "layers": args.layers, "embd": args.embd, "ffn": args.ffn or 4 * args.embd,
      "ctx": T, "batch": B,
      "threads": args.threads, "params": n_params, "steps_timed": len(timed),
      "median_step_s": round(median, 4), "tokens_per_s": round(tok_s, 1),
      "best_tokens_per_s": round(B * T / min(timed), 1),
      "flop_per_s": float(f"{6 * n_params * tok_s:.4g}"),
      "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "torch_blas_info": "generic (libblas.so.3)" if "BLAS_INFO=generic" in
      torch.__config__.show() else torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0],
      "blas": blas, "sgemm_1024x768x768_gflops": round(gflops, 1),
      "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
  main()
