"""Same-run A/B of Orchard CUDA builds. One run times the build on PYTHONPATH once per case
(forward, and the backward with --bwd; `cuda_time`'s median of 30 calls) and prints one JSON line;
tools/gpu_ab.sh runs it for each build in turn, several rounds, and compares each build's best
round. Checksums of the outputs (out, lse, and dq, dk with --bwd) let the summary say whether the
builds computed the same numbers. bf16, DESIGN.md's FLOP formula.

    PYTHONPATH=SITE python bench/ab_cuda.py NAME [--flash] [--bwd] [--cases B:S:H:D[:c],...]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda import cuda_time, visible_pairs  # noqa: E402

from orchard import _ops  # noqa: E402

DEFAULT_CASES = "16:1024:32:64:c,8:2048:32:64:c,4:4096:32:64:c,8:2048:32:80:c,16:1024:32:64"


def parse_case(text: str):
    """'B:S:H:D' or 'B:S:H:D:c' (causal) -> (B, S, H, D, causal)."""
    parts = text.split(":")
    if len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] != "c"):
        raise SystemExit(f"ab_cuda.py: a case is B:S:H:D or B:S:H:D:c, got {text!r}")
    B, S, H, D = (int(x) for x in parts[:4])
    return B, S, H, D, len(parts) == 5


def measure(B, S, H, D, causal, bwd: bool, flash: bool) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    flops = 4 * B * H * D * visible_pairs(S, causal, -1)
    # The op's options: no varlen, no dropout, default scale, causal as a right window of 0.
    opts = (None, None, 0, 0, 0.0, None, causal, -1, 0 if causal else -1, 0.0, None,
            torch.zeros(2, dtype=torch.int64), False)
    out, lse = _ops.ops.fwd(q, k, v, *opts, "bench")
    res = {"fwd": flops / cuda_time(lambda: _ops.ops.fwd(q, k, v, *opts, "bench")) / 1e12,
           "out_sum": float(out.float().abs().sum()), "lse_sum": float(lse.sum())}
    if bwd:
        args = (dout, q, k, v, out, lse, *opts, True, True, True, "bench")
        dq, dk, _ = _ops.ops.bwd(*args)
        res["bwd"] = 2.5 * flops / cuda_time(lambda: _ops.ops.bwd(*args)) / 1e12
        res["dq_sum"], res["dk_sum"] = float(dq.float().abs().sum()), float(dk.float().abs().sum())
    if flash:
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            res["flash_fwd"] = flops / cuda_time(
                lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)) / 1e12
            if bwd:
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                g = dout.transpose(1, 2)
                res["flash_bwd"] = 2.5 * flops / cuda_time(lambda: torch.autograd.grad(
                    o, (qt, kt, vt), g, retain_graph=True)) / 1e12
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="the build's name in the JSON line")
    ap.add_argument("--flash", action="store_true", help="also time SDPA's flash backend")
    ap.add_argument("--bwd", action="store_true", help="also time the backward")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="B:S:H:D[:c],... (c = causal)")
    a = ap.parse_args()
    row = {"build": a.name}
    for text in a.cases.split(","):
        B, S, H, D, causal = parse_case(text)
        row[f"d{D}{'c' if causal else ''}_{S}"] = measure(B, S, H, D, causal, a.bwd, a.flash)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
