"""An independent RWKV-7 ("x070") in plain PyTorch, the reference the training checks compare
aviary against.

Written from the published RWKV-7 math (BlinkDL's RWKV-LM model.py "slow pytorch version"
comments and rwkv_v7_demo.py), not from aviary's C++. Parameters are a dict of tensors with the
names and shapes of BlinkDL's .pth files (emb.weight (V, C), blocks.L.att.w1 (C, Dw), ...), so a
.pth loads with torch.load and goes straight in. The WKV recurrence is a Python loop over time
steps, like the official code's CUDA-free path; every other op is an ordinary batched tensor op,
so autograd gives the reference gradients.

Used by check_gradients.py, check_export.py and bench/train_torch.py; run with Debian's
/usr/bin/python3 (python3-torch). No command line of its own.

State (so a sequence can be processed as consecutive chunks): per layer a tuple
(att_x (B, C): the last ln1 output, wkv (B, H, N, N) indexed [head][value i][key j],
ffn_x (B, C): the last ln2 output). The flat file layout (aviary's) is, per sequence b, per
layer l: att_x (C floats), wkv (H*N*N: head, then value row i, then key column j), ffn_x (C):
B x L x (2C + C N) float32; see state_to_flat / state_from_flat.
"""

import math

import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5
GROUP_NORM_EPS = 64e-5  # RWKV-7's ln_x (GroupNorm over each head)
L2WRAP_FACTOR = 1e-4    # RWKV-LM's L2Wrap: 1e-4 / (B T) times the largest logit


class Config:
  """Sizes read from a parameter dict (nothing is assumed beyond the names)."""

  def __init__(self, params):
    self.n_layer = 0
    while f"blocks.{self.n_layer}.ln1.weight" in params:
      self.n_layer += 1
    if self.n_layer == 0:
      raise ValueError("not an RWKV-7 parameter set: no blocks.0.ln1.weight")
    self.vocab, self.n_embd = params["emb.weight"].shape
    self.n_head, self.head_size = params["blocks.0.att.r_k"].shape
    self.n_ffn = params["blocks.0.ffn.key.weight"].shape[0]
    if self.n_head * self.head_size != self.n_embd:
      raise ValueError(f"r_k is {self.n_head}x{self.head_size}, C is {self.n_embd}")

  def state_floats_per_layer(self):
    return 2 * self.n_embd + self.n_embd * self.head_size


def layer_norm(x, weight, bias):
  return F.layer_norm(x, (x.shape[-1],), weight, bias, LAYER_NORM_EPS)


def token_shift(x, last):
  """The previous token's x for each position: `last` (B, C) for the first one."""
  return torch.cat([last.unsqueeze(1), x[:, :-1]], dim=1)


def wkv7(r, decay, k, v, kk, a, state):
  """The RWKV-7 recurrence, one time step at a time. All inputs (B, T, H, N); state
  (B, H, N, N) as S[value i][key j]. Per step: S = S diag(decay) + (S (-kk)) (kk a)^T + v k^T,
  y = S r. Returns y (B, T, H, N) and the last state.

  Each head's state is one (N, N) matrix of a batch of B H, so a step is three batched products
  (bmm, baddbmm) on per-step slices laid out ahead of the loop; autograd then keeps one state
  per step for the backward pass and nothing larger. The slices come from unbind, whose
  backward stacks the T gradients once (indexing x[t] would add each step's gradient into a
  zero tensor of all T steps: quadratic in T)."""
  B, T, H, N = r.shape
  steps = lambda x, shape: x.permute(1, 0, 2, 3).reshape(T, B * H, *shape).unbind(0)
  r_t, k_t, v_t = steps(r, (N, 1)), steps(k, (1, N)), steps(v, (N, 1))
  decay_t = steps(decay, (1, N))
  minus_kk_t, kk_a_t = steps(-kk, (N, 1)), steps(kk * a, (1, N))
  S = state.reshape(B * H, N, N)
  ys = []
  for t in range(T):
    removed = torch.bmm(S, minus_kk_t[t])  # (B H, N, 1): what the state holds along kk
    S = torch.baddbmm(torch.baddbmm(S * decay_t[t], removed, kk_a_t[t]), v_t[t], k_t[t])
    ys.append(torch.bmm(S, r_t[t]))
  y = torch.stack(ys).view(T, B, H, N).permute(1, 0, 2, 3)
  return y, S.view(B, H, N, N)


def time_mix(p, prefix, layer, x, last_x, S, v_first, cfg):
  B, T, C = x.shape
  H, N = cfg.n_head, cfg.head_size
  g_ = lambda name: p[f"{prefix}.{name}"]
  delta = token_shift(x, last_x) - x
  xr, xw, xk, xv, xa, xg = (x + delta * g_(m).view(C) for m in
                            ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))

  r = xr @ g_("receptance.weight").t()
  k = xk @ g_("key.weight").t()
  v = xv @ g_("value.weight").t()
  # Soft-clamped to (-inf, -0.5), then decay = exp(-exp(w)) in (exp(-e^-0.5), 1).
  w = g_("w0").view(C) + torch.tanh(xw @ g_("w1")) @ g_("w2")
  w = -F.softplus(-w) - 0.5
  decay = torch.exp(-torch.exp(w))
  if layer == 0:
    v_first = v
  else:
    v = v + (v_first - v) * torch.sigmoid(g_("v0").view(C) + (xv @ g_("v1")) @ g_("v2"))
  a = torch.sigmoid(g_("a0").view(C) + (xa @ g_("a1")) @ g_("a2"))
  g = torch.sigmoid(xg @ g_("g1")) @ g_("g2")

  kk = F.normalize((k * g_("k_k").view(C)).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
  k = k * (1 + (a - 1) * g_("k_a").view(C))

  heads = lambda t: t.view(B, T, H, N)
  y, S = wkv7(heads(r), heads(decay), heads(k), heads(v), kk, heads(a), S)
  y = F.group_norm(y.reshape(B * T, C), H, g_("ln_x.weight"), g_("ln_x.bias"),
                   GROUP_NORM_EPS).view(B, T, C)
  bonus = (heads(r) * heads(k) * g_("r_k")).sum(dim=-1, keepdim=True) * heads(v)
  y = y + bonus.reshape(B, T, C)
  out = (y * g) @ g_("output.weight").t()
  return out, x[:, -1], S, v_first


def channel_mix(p, prefix, x, last_x, C):
  mixed = x + (token_shift(x, last_x) - x) * p[f"{prefix}.x_k"].view(C)
  hidden = torch.relu(mixed @ p[f"{prefix}.key.weight"].t()) ** 2
  return hidden @ p[f"{prefix}.value.weight"].t(), x[:, -1]


def zero_state(cfg, batch, dtype=torch.float32):
  C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
  return [(torch.zeros(batch, C, dtype=dtype), torch.zeros(batch, H, N, N, dtype=dtype),
           torch.zeros(batch, C, dtype=dtype)) for _ in range(cfg.n_layer)]


def forward(params, tokens, state=None):
  """tokens (B, T) long -> (logits (B, T, V), new state). `state` None starts from zeros."""
  cfg = Config(params)
  B, T = tokens.shape
  C = cfg.n_embd
  dtype = params["emb.weight"].dtype
  if state is None:
    state = zero_state(cfg, B, dtype)
  x = F.embedding(tokens, params["emb.weight"])
  x = layer_norm(x, params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"])
  v_first = None
  new_state = []
  for l in range(cfg.n_layer):
    b = f"blocks.{l}"
    att_x, S, ffn_x = state[l]
    xn = layer_norm(x, params[f"{b}.ln1.weight"], params[f"{b}.ln1.bias"])
    out, att_x, S, v_first = time_mix(params, f"{b}.att", l, xn, att_x, S, v_first, cfg)
    x = x + out
    xn = layer_norm(x, params[f"{b}.ln2.weight"], params[f"{b}.ln2.bias"])
    out, ffn_x = channel_mix(params, f"{b}.ffn", xn, ffn_x, C)
    x = x + out
    new_state.append((att_x, S, ffn_x))
  x = layer_norm(x, params["ln_out.weight"], params["ln_out.bias"])
  return x @ params["head.weight"].t(), new_state


class L2Wrap(torch.autograd.Function):
  """RWKV-LM's L2Wrap: returns the loss unchanged; its backward adds to the logits' gradient
  1e-4 / (B T) times each position's largest logit, at that logit (pushing the largest logits
  towards zero), scaled by the incoming gradient (RWKV-LM's noted fix)."""

  @staticmethod
  def forward(ctx, loss, logits):
    ctx.save_for_backward(logits)
    return loss

  @staticmethod
  def backward(ctx, grad_output):
    (logits,) = ctx.saved_tensors
    factor = L2WRAP_FACTOR / (logits.shape[0] * logits.shape[1])
    top, ids = torch.max(logits, -1, keepdim=True)
    grad = torch.zeros_like(logits)
    grad.scatter_(-1, ids, top * factor)
    return grad_output, grad_output * grad


def loss_fn(logits, targets, l2wrap=True):
  """Mean cross-entropy over all B T positions (+ L2Wrap's gradient term)."""
  loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
  return L2Wrap.apply(loss, logits) if l2wrap else loss


def state_to_flat(state):
  """Per-layer tuples -> (B, L * (2C + C N)) in aviary's flat layout."""
  per_layer = [torch.cat([ax, S.reshape(S.shape[0], -1), fx], dim=1) for ax, S, fx in state]
  return torch.cat(per_layer, dim=1)


def state_from_flat(flat, cfg):
  """(B, L * (2C + C N)) or a flat vector -> per-layer tuples (views into `flat`)."""
  C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
  flat = flat.reshape(-1, cfg.n_layer, cfg.state_floats_per_layer())
  B = flat.shape[0]
  return [(flat[:, l, :C], flat[:, l, C:C + C * N].reshape(B, H, N, N), flat[:, l, C + C * N:])
          for l in range(cfg.n_layer)]


def lora_dims(C):
  """RWKV-LM's suggested low-rank widths (decay, a, v, gate) for width C."""
  r = lambda k: max(32, int(round(k * math.sqrt(C) / 32) * 32))
  return r(2.5), r(2.5), r(1.7), r(5.0)


def param_shapes(n_layer, C, vocab, head_size=64, n_ffn=None, dims=None):
  """The names and .pth shapes of an RWKV-7 model, in RWKV-LM's state_dict order."""
  H = C // head_size
  n_ffn = n_ffn or 4 * C
  Dw, Da, Dv, Dg = dims or lora_dims(C)
  shapes = {"emb.weight": (vocab, C)}
  for l in range(n_layer):
    b = f"blocks.{l}"
    shapes[f"{b}.ln1.weight"] = shapes[f"{b}.ln1.bias"] = (C,)
    shapes[f"{b}.ln2.weight"] = shapes[f"{b}.ln2.bias"] = (C,)
    if l == 0:
      shapes[f"{b}.ln0.weight"] = shapes[f"{b}.ln0.bias"] = (C,)
    a = f"{b}.att"
    for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
      shapes[f"{a}.{m}"] = (1, 1, C)
    for name, D in (("w", Dw), ("a", Da), ("v", Dv)):
      shapes[f"{a}.{name}0"] = (1, 1, C)
      shapes[f"{a}.{name}1"] = (C, D)
      shapes[f"{a}.{name}2"] = (D, C)
    shapes[f"{a}.g1"] = (C, Dg)
    shapes[f"{a}.g2"] = (Dg, C)
    shapes[f"{a}.k_k"] = shapes[f"{a}.k_a"] = (1, 1, C)
    shapes[f"{a}.r_k"] = (H, head_size)
    for m in ("receptance", "key", "value", "output"):
      shapes[f"{a}.{m}.weight"] = (C, C)
    shapes[f"{a}.ln_x.weight"] = shapes[f"{a}.ln_x.bias"] = (C,)
    shapes[f"{b}.ffn.x_k"] = (1, 1, C)
    shapes[f"{b}.ffn.key.weight"] = (n_ffn, C)
    shapes[f"{b}.ffn.value.weight"] = (C, n_ffn)
  shapes["ln_out.weight"] = shapes["ln_out.bias"] = (C,)
  shapes["head.weight"] = (vocab, C)
  return shapes


def random_params(shapes, seed, dtype=torch.float64):
  """Random weights where every term is visible: no zeros, matrices scaled by 1/sqrt(in),
  mixes in (0, 1), decays spread over (0, 1), gates and norms around their working points.
  Not the official initialisation (its zero matrices would hide whole terms of the gradient)."""
  gen = torch.Generator().manual_seed(seed)
  uni = lambda shape, lo, hi: torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
  params = {}
  for name, shape in shapes.items():
    leaf = name.split(".")[-1] if not name.endswith((".weight", ".bias")) else \
        ".".join(name.split(".")[-2:])
    if name == "emb.weight":
      p = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif name == "head.weight":
      p = uni(shape, -3, 3) / math.sqrt(shape[1])   # logits with a spread of a few units
    elif leaf in ("ln1.weight", "ln2.weight", "ln0.weight", "ln_out.weight", "ln_x.weight"):
      p = uni(shape, 0.6, 1.4)
    elif leaf.endswith(".bias"):
      p = uni(shape, -0.2, 0.2)
    elif leaf in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
      p = uni(shape, 0.05, 0.95)
    elif leaf == "w0":
      p = uni(shape, -3.0, 1.5)
    elif leaf in ("a0", "v0"):
      p = uni(shape, -1.0, 1.0)
    elif leaf in ("w1", "a1", "v1", "g1"):
      p = uni(shape, -1, 1) * math.sqrt(3.0 / shape[0])
    elif leaf in ("w2", "a2", "v2", "g2"):
      p = uni(shape, -1, 1) * math.sqrt(3.0 / shape[0])
    elif leaf == "k_k":
      p = uni(shape, 0.5, 1.0)
    elif leaf == "k_a":
      p = uni(shape, 0.5, 1.5)
    elif leaf == "r_k":
      p = uni(shape, -0.5, 0.5)
    elif len(shape) == 2:  # the square and ffn projections
      p = uni(shape, -1, 1) * math.sqrt(3.0 / shape[1])
    else:
      raise ValueError(f"no rule for {name}")
    params[name] = p.to(dtype).reshape(shape).contiguous()
  return params
