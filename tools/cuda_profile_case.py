"""One Orchard forward + backward on CUDA at a FlashAttention benchmark shape, for profilers:
    ncu -k regex:attention --launch-skip 3 -c 3 python tools/cuda_profile_case.py --S 4096 --D 128
Runs warm-up iterations first so that the profiled launches are steady-state ones."""

import argparse

import torch

import orchard

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--S", type=int, default=4096)
ap.add_argument("--D", type=int, default=128)
ap.add_argument("--causal", action="store_true")
ap.add_argument("--iters", type=int, default=3)
args = ap.parse_args()

B, H = 16384 // args.S, 2048 // args.D
q, k, v = (torch.randn(B, args.S, H, args.D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
for _ in range(args.iters):
    out = orchard.flash_attn_func(q, k, v, causal=args.causal)
    out.backward(torch.ones_like(out))
torch.cuda.synchronize()
print("ok", tuple(q.shape))
