#!/usr/bin/python3
"""Expected values of RWKV-LM's RWKV-7 initialisation, for tests/train_init_test.cpp.

A transcription of the formulas in BlinkDL/RWKV-LM RWKV-v7/train_temp/src/model.py
(RWKV_Tmix_x070.__init__, RWKV_CMix_x070.__init__, Block.__init__ and
RWKV.generate_init_weight), run with torch's float32 arithmetic. RWKV-LM itself is not imported
(it needs CUDA and Lightning).

  official_init.py model L C N V F OUT_DIR
      writes OUT_DIR/manifest.txt, one line per tensor of the .pth in state_dict order:
        NAME tensor            (values in OUT_DIR/NAME.f32, the .pth's shape, row-major)
        NAME orthogonal GAIN   (torch.nn.init.orthogonal_ of the .pth-shaped matrix)
        NAME uniform A B
  official_init.py orthogonal ROWS COLS GAIN IN OUT
      torch.nn.init.orthogonal_'s arithmetic on the Gaussian matrix in IN (float64, row-major)
      instead of one torch draws; the result (float32, row-major) in OUT.
"""
import math
import os
import sys

import numpy as np
import torch


def orthogonal_from(gaussian, gain):
    # torch.nn.init.orthogonal_ after its normal_() draw.
    rows, cols = gaussian.shape
    flattened = gaussian.clone()
    if rows < cols:
        flattened.t_()
    q, r = torch.linalg.qr(flattened)
    d = torch.diag(r, 0)
    q *= d.sign()
    if rows < cols:
        q.t_()
    return q * gain


def module_init(L, C, N, V, F):
    """name -> (shape, value) where value is a tensor, ("orthogonal", gain), ("uniform", a, b)
    or ("random",) for what generate_init_weight replaces anyway."""
    H = C // N
    m = {}
    m["emb.weight"] = ((V, C), ("random",))  # nn.Embedding: N(0, 1)

    def layer_norm(prefix):
        m[prefix + ".weight"] = ((C,), torch.ones(C))
        m[prefix + ".bias"] = ((C,), torch.zeros(C))

    def ortho_init(shape, scale):
        gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1
        return ("orthogonal", gain * scale)

    for layer_id in range(L):
        b = f"blocks.{layer_id}."
        layer_norm(b + "ln1")
        layer_norm(b + "ln2")
        if layer_id == 0:
            layer_norm(b + "ln0")
        # RWKV_Tmix_x070
        ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0  # model.py divides by zero at L=1
        ratio_1_to_almost0 = 1.0 - (layer_id / L)
        ddd = torch.ones(1, 1, C)
        for i in range(C):
            ddd[0, 0, i] = i / C
        for name, k in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9),
                        ("x_g", 0.2)):
            m[b + "att." + name] = ((1, 1, C), 1.0 - torch.pow(ddd, k * ratio_1_to_almost0))
        www = torch.zeros(C)
        zigzag = torch.zeros(C)
        linear = torch.zeros(C)
        for n in range(C):
            linear[n] = n / (C - 1) - 0.5
            zigzag[n] = ((n % N) - ((N - 1) / 2)) / ((N - 1) / 2)
            zigzag[n] = zigzag[n] * abs(zigzag[n])
            www[n] = -6 + 6 * (n / (C - 1)) ** (1 + 1 * ratio_0_to_1 ** 0.3)

        def low_rank(k):
            return max(32, int(round((k * (C ** 0.5)) / 32) * 32))

        D = low_rank(2.5)
        m[b + "att.w1"] = ((C, D), torch.zeros(C, D))
        m[b + "att.w2"] = ((D, C), ortho_init((D, C), 0.1))
        m[b + "att.w0"] = ((1, 1, C), www.reshape(1, 1, C) + 0.5 + zigzag * 2.5)
        D = low_rank(2.5)
        m[b + "att.a1"] = ((C, D), torch.zeros(C, D))
        m[b + "att.a2"] = ((D, C), ortho_init((D, C), 0.1))
        m[b + "att.a0"] = ((1, 1, C), torch.zeros(1, 1, C) - 0.19 + zigzag * 0.3 + linear * 0.4)
        D = low_rank(1.7)
        m[b + "att.v1"] = ((C, D), torch.zeros(C, D))
        m[b + "att.v2"] = ((D, C), ortho_init((D, C), 0.1))
        m[b + "att.v0"] = ((1, 1, C), torch.zeros(1, 1, C) + 0.73 - linear * 0.4)
        D = low_rank(5)
        m[b + "att.g1"] = ((C, D), torch.zeros(C, D))
        m[b + "att.g2"] = ((D, C), ortho_init((D, C), 0.1))
        m[b + "att.k_k"] = ((1, 1, C), torch.zeros(1, 1, C) + 0.71 - linear * 0.1)
        m[b + "att.k_a"] = ((1, 1, C), torch.zeros(1, 1, C) + 1.02)
        m[b + "att.r_k"] = ((H, N), torch.zeros(H, N) - 0.04)
        s = 0.5 / (C ** 0.5)
        m[b + "att.receptance.weight"] = ((C, C), ("uniform", -s, s))
        m[b + "att.key.weight"] = ((C, C), ("uniform", -0.1 * s, 0.1 * s))
        m[b + "att.value.weight"] = ((C, C), ("uniform", -s, s))
        m[b + "att.output.weight"] = ((C, C), torch.zeros(C, C))
        m[b + "att.ln_x.weight"] = ((C,), torch.ones(C))  # nn.GroupNorm
        m[b + "att.ln_x.bias"] = ((C,), torch.zeros(C))
        # RWKV_CMix_x070
        m[b + "ffn.x_k"] = ((1, 1, C), 1.0 - torch.pow(ddd, ratio_1_to_almost0 ** 4))
        m[b + "ffn.key.weight"] = ((F, C), ("uniform", -s, s))
        m[b + "ffn.value.weight"] = ((C, F), torch.zeros(C, F))
    layer_norm("ln_out")
    m["head.weight"] = ((V, C), ("random",))  # nn.Linear's kaiming uniform
    return m


def generate_init_weight(module, L, C, V):
    """RWKV.generate_init_weight's rules: name -> value as above."""
    out = {}
    for n, (shape, p) in module.items():
        scale = 1.0
        if ("ln_" in n or ".ln" in n or "time_" in n or "_mask" in n or "pos_emb" in n
                or '.mask.' in n or n.endswith('_w') or n.endswith('_w1') or n.endswith('_w2')
                or n.endswith('_bias') or (".weight" not in n)):
            if 'ln_x.weight' in n:
                layer_scale = (1 + int(n.split('.')[1])) / L
                out[n] = (shape, (p * 0.0) + (layer_scale ** 0.7))
            else:
                out[n] = (shape, p)
        elif n == "emb.weight":
            scale = -1e-4
            out[n] = (shape, ("uniform", scale, -scale))
        elif n == "head.weight":
            scale = 0.5 * math.sqrt(V / C) if V > C else 0.5
            out[n] = (shape, ("orthogonal", scale))
        else:
            assert n.endswith('.weight')
            zero = [".att.output.", ".ffn.value.", ".ffn.receptance.", ".ffnPre.value.",
                    ".ffnPre.receptance.", "head_q.", '.oo.', '.rr.']
            for kk in zero:
                if kk in n:
                    scale = 0
            for kk in [".att.key.", ".att.gate."]:
                if kk in n:
                    scale = 0.1
            if scale == 0:
                out[n] = (shape, torch.zeros(shape))
            elif scale < 0:
                out[n] = (shape, ("uniform", scale, -scale))
            else:
                out[n] = (shape, ("orthogonal", scale))
    return out


def main():
    if sys.argv[1] == "model":
        L, C, N, V, F = (int(a) for a in sys.argv[2:7])
        out_dir = sys.argv[7]
        os.makedirs(out_dir, exist_ok=True)
        weights = generate_init_weight(module_init(L, C, N, V, F), L, C, V)
        with open(os.path.join(out_dir, "manifest.txt"), "w") as manifest:
            for n, (shape, p) in weights.items():
                if isinstance(p, torch.Tensor):
                    assert tuple(p.shape) == tuple(shape), n
                    p.to(torch.float32).contiguous().numpy().tofile(os.path.join(out_dir, n + ".f32"))
                    manifest.write(f"{n} tensor\n")
                else:
                    assert p[0] != "random", n + " keeps a value model.py draws at random"
                    manifest.write(" ".join([n] + [repr(float(x)) if i else x for i, x in enumerate(p)]) + "\n")
    elif sys.argv[1] == "orthogonal":
        rows, cols = int(sys.argv[2]), int(sys.argv[3])
        gain = float(sys.argv[4])
        gaussian = torch.from_numpy(np.fromfile(sys.argv[5], dtype=np.float64).reshape(rows, cols))
        orthogonal_from(gaussian, gain).to(torch.float32).numpy().tofile(sys.argv[6])
    else:
        sys.exit("usage: official_init.py model L C N V F OUT_DIR | orthogonal ROWS COLS GAIN IN OUT")


if __name__ == "__main__":
    main()
