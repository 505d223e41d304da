#!/usr/bin/python3
"""torch.optim.AdamW with RWKV-LM's parameter groups and Lightning's gradient clipping, for
tests/train_optimizer_test.cpp.

  official_adamw.py DIR
reads DIR/setup.txt:
  beta1 beta2 eps grad_clip steps          (first line)
  lr_0 ... lr_{steps-1}                    (second line: the schedule's rate of each step)
  offset size lr_scale weight_decay trainable   (one line per tensor)
and DIR/params.f32, DIR/grads_<step>.f32 (float32, the flat layout); writes DIR/out_params.f32,
DIR/out_m.f32, DIR/out_v.f32 (the moments, 0 where no tensor trains) and DIR/out_norms.txt
(clip_grad_norm_'s total norm at each step).
"""
import os
import sys

import numpy as np
import torch


def main():
    d = sys.argv[1]
    with open(os.path.join(d, "setup.txt")) as f:
        head = f.readline().split()
        beta1, beta2, eps, clip = (float(x) for x in head[:4])
        steps = int(head[4])
        lrs = [float(x) for x in f.readline().split()]
        entries = [line.split() for line in f if line.strip()]
    flat = np.fromfile(os.path.join(d, "params.f32"), dtype=np.float32)
    tensors, groups = [], {}
    for offset, size, lr_scale, wd, trainable in entries:
        offset, size = int(offset), int(size)
        t = torch.from_numpy(flat[offset:offset + size].copy()).requires_grad_(trainable == "1")
        tensors.append((offset, size, t))
        if trainable == "1":
            groups.setdefault((float(lr_scale), float(wd)), []).append(t)
    param_groups = [{"params": ps, "weight_decay": wd, "my_lr_scale": scale}
                    for (scale, wd), ps in groups.items()]
    optimizer = torch.optim.AdamW(param_groups, lr=lrs[0], betas=(beta1, beta2), eps=eps)
    trainable = [t for _, _, t in tensors if t.requires_grad]
    norms = []
    for step in range(steps):
        grads = np.fromfile(os.path.join(d, f"grads_{step}.f32"), dtype=np.float32)
        for offset, size, t in tensors:
            if t.requires_grad:
                t.grad = torch.from_numpy(grads[offset:offset + size].copy())
        # Lightning's gradient_clip_val (norm algorithm): clip_grad_norm_ over all parameters.
        if clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, clip)))
        else:
            norms.append(float(torch.norm(torch.stack([torch.norm(t.grad) for t in trainable]))))
        for group in optimizer.param_groups:
            group["lr"] = lrs[step] * group["my_lr_scale"]
        optimizer.step()
    out_p = flat.copy()
    out_m = np.zeros_like(flat)
    out_v = np.zeros_like(flat)
    for offset, size, t in tensors:
        out_p[offset:offset + size] = t.detach().numpy()
        if t.requires_grad:
            state = optimizer.state[t]
            out_m[offset:offset + size] = state["exp_avg"].numpy()
            out_v[offset:offset + size] = state["exp_avg_sq"].numpy()
    out_p.tofile(os.path.join(d, "out_params.f32"))
    out_m.tofile(os.path.join(d, "out_m.f32"))
    out_v.tofile(os.path.join(d, "out_v.f32"))
    with open(os.path.join(d, "out_norms.txt"), "w") as f:
        f.write(" ".join(repr(n) for n in norms) + "\n")


if __name__ == "__main__":
    main()
