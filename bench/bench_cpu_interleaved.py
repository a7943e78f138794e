"""Orchard vs PyTorch's CPU SDPA (flash kernel), calls interleaved: each repetition times one
Orchard call and one SDPA call, in alternating order, and reports each side's fastest of `--reps`
and the median over repetitions of the pair's ratio. On a shared VM whose speed drifts by 10-30%
over minutes this compares the two under the same conditions, where bench_torch_cpu.py (median of
a few runs of one side, then the other) can be skewed; the median ratio is the steadier figure.
Shapes as bench_torch_cpu.py: B * S = 8192 tokens, Hq * D = 1024; DESIGN.md's FLOP formula.

    python bench/bench_cpu_interleaved.py fwd|bwd [--dtypes float32,bfloat16]
        [--seqlens 512,1024,2048,4096] [--dims 64,128] [--reps 5]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard


def closures(mode, B, S, H, D, causal, dtype):
    """Seconds of one Orchard and one SDPA call (the backward alone for mode bwd)."""
    q, k, v = (torch.randn(B, S, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dout = torch.randn(B, S, H, D, dtype=dtype)
    dout_t = dout.transpose(1, 2).contiguous()

    def run(attn, inputs, grad):
        if mode == "fwd":
            with torch.no_grad():
                t0 = time.perf_counter()
                attn(*inputs)
                return time.perf_counter() - t0
        out = attn(*inputs)
        t0 = time.perf_counter()
        torch.autograd.grad(out, inputs, grad)
        return time.perf_counter() - t0

    def sdpa(*x):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*x, is_causal=causal)

    return (lambda: run(lambda *x: orchard.flash_attn_func(*x, causal=causal), (q, k, v), dout),
            lambda: run(sdpa, (qt, kt, vt), dout_t))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("fwd", "bwd"))
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--seqlens", default="512,1024,2048,4096")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.dtypes.split(","):
        for D in map(int, args.dims.split(",")):
            for causal in (False, True):
                for S in map(int, args.seqlens.split(",")):
                    B, H = 8192 // S, 1024 // D
                    orchard_call, sdpa_call = closures(args.mode, B, S, H, D, causal,
                                                       getattr(torch, name))
                    orchard_call(), sdpa_call()  # warm-up
                    pairs = []  # (orchard seconds, sdpa seconds)
                    for rep in range(args.reps):
                        if rep % 2:
                            s_time = sdpa_call()
                            pairs.append((orchard_call(), s_time))
                        else:
                            pairs.append((orchard_call(), sdpa_call()))
                    best_o, best_s = min(o for o, _ in pairs), min(s for _, s in pairs)
                    ratio = statistics.median(s / o for o, s in pairs)
                    flops = 4 * B * H * S * S * D / (2 if causal else 1)
                    flops *= 2.5 if args.mode == "bwd" else 1
                    go, gs = flops / best_o / 1e9, flops / best_s / 1e9
                    print(f"{args.mode} {name:8} D {D:3} causal {int(causal)} S {S:5}: Orchard "
                          f"{go:7.1f} SDPA {gs:7.1f} GFLOP/s  best {go / gs:.2f}x  "
                          f"median {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
