"""Extra memory of Orchard's forward + backward on the CPU grows as O(S), not O(S^2).

Each sequence length runs in a fresh process: peak resident memory (ru_maxrss) after forward +
backward, minus the peak once inputs, output-sized buffers and gradients exist.

    python bench/memory_cpu.py --seqlens 2048,8192
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

import orchard


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(S: int, H: int, D: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, S, H, D)
    # One-time costs (thread pool, allocator arenas) come from a small warm-up call; the
    # tensors the call returns (out, dq, dk, dv) are materialised once so the baseline holds them.
    w = torch.randn(1, 64, H, D, requires_grad=True)
    torch.autograd.grad(orchard.flash_attn_func(w, w, w, causal=True).sum(), w)
    scratch = [torch.randn(1, S, H, D) for _ in range(4)]
    del scratch
    base = peak_mib()
    out = orchard.flash_attn_func(q, k, v, causal=True)
    torch.autograd.grad(out, (q, k, v), dout)
    return {"S": S, "H": H, "D": D, "extra_mib": peak_mib() - base,
            "inputs_mib": 3 * q.numel() * 4 / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlens", default="2048,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.heads, args.dim)))
        return
    rows = []
    for S in map(int, args.seqlens.split(",")):
        res = subprocess.run([sys.executable, __file__, "--child", str(S), "--heads",
                              str(args.heads), "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"S={S:6d}: extra peak {rows[-1]['extra_mib']:.1f} MiB "
              f"(inputs {rows[-1]['inputs_mib']:.1f} MiB); an S x S fp32 score matrix per head "
              f"would be {S * S * 4 * args.heads / 2**20:.0f} MiB")
    if len(rows) >= 2:
        growth = rows[-1]["extra_mib"] / max(rows[0]["extra_mib"], 1e-3)
        ratio = rows[-1]["S"] / rows[0]["S"]
        print(f"extra memory grew {growth:.1f}x for {ratio:.0f}x the sequence: a constant "
              f"(threads, tiles) plus O(S) buffers; an S x S matrix would grow {ratio**2:.0f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
