"""Same-run A/B of Orchard CUDA builds. One run times the build on PYTHONPATH once per case
(forward, and the backward with --bwd; `cuda_time`'s median of 30 calls) and prints one JSON line;
tools/gpu_ab.sh runs it for each build in turn, several rounds, and compares each build's best
round. Checksums of the outputs (out, lse, and dq, dk with --bwd) let the summary say whether the
builds computed the same numbers. bf16, DESIGN.md's FLOP formula.

    PYTHONPATH=SITE python bench/ab_cuda.py NAME [--flash] [--bwd [--grads q|kv]] [--varlen]
        [--cases B:S:H:D[:c[:wW]],...]

H is a head count or Hq/Hkv (GQA); wW a left window of W keys (causal cases). SDPA's flash
backend runs only where Hq == Hkv and there is no window. --grads q (kv) asks the backward for dQ
(dK and dV) alone, which times one of the unfused backward's two kernels (plus the preprocess);
its "bwd" is then FLOPs of the whole backward over that time, comparable only with itself.
--varlen packs each case's batch as one varlen batch of B sequences of S / 2 and 3 S / 2 tokens
in turn (B even: B x S tokens), FLOPs counted per sequence; SDPA has no peer for it.
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
    """'B:S:H:D', 'B:S:H:D:c' (causal) or 'B:S:H:D:c:wW', H = 'Hq' or 'Hq/Hkv'
    -> (key, B, S, Hq, Hkv, D, causal, window)."""
    parts = text.split(":")
    ok = 4 <= len(parts) <= 6 and (len(parts) < 5 or parts[4] == "c") and \
        (len(parts) < 6 or parts[5].startswith("w"))
    if not ok:
        raise SystemExit(f"ab_cuda.py: a case is B:S:H:D[:c[:wW]], got {text!r}")
    B, S, D = int(parts[0]), int(parts[1]), int(parts[3])
    Hq, Hkv = (int(x) for x in parts[2].split("/")) if "/" in parts[2] else (int(parts[2]),) * 2
    causal, window = len(parts) >= 5, int(parts[5][1:]) if len(parts) == 6 else -1
    key = f"d{D}{'c' if causal else ''}_{S}" + (f"_h{Hq}-{Hkv}" if Hq != Hkv else "") + \
        (f"_w{window}" if window >= 0 else "")
    return key, B, S, Hq, Hkv, D, causal, window


def measure(B, S, Hq, Hkv, D, causal, window, bwd: bool, flash: bool, grads: str = "qkv",
            varlen: bool = False) -> dict:
    torch.manual_seed(0)
    shape = (1, B * S) if varlen else (B, S)
    q = torch.randn(*shape, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(*shape, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    lens = [S // 2 if i % 2 == 0 else S + S // 2 for i in range(B)] if varlen else [S] * B
    flops = 4 * Hq * D * sum(visible_pairs(n, causal, window) for n in lens)
    flash = flash and Hq == Hkv and window < 0 and not varlen
    cu, longest = None, 0
    if varlen:  # (total, H, D) tensors and their sequences' offsets
        q, k, v, dout = (x[0] for x in (q, k, v, dout))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        longest = max(lens)
    # The op's options: no dropout, default scale, causal as a right window of 0.
    opts = (cu, cu, longest, longest, 0.0, None, causal, window, 0 if causal else -1, 0.0, None,
            torch.zeros(2, dtype=torch.int64), False)
    out, lse = _ops.ops.fwd(q, k, v, *opts, "bench")
    res = {"fwd": flops / cuda_time(lambda: _ops.ops.fwd(q, k, v, *opts, "bench")) / 1e12,
           "out_sum": float(out.float().abs().sum()), "lse_sum": float(lse.sum())}
    if bwd:
        args = (dout, q, k, v, out, lse, *opts, "q" in grads, "kv" in grads, "kv" in grads, "bench")
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
    ap.add_argument("--grads", choices=("qkv", "q", "kv"), default="qkv",
                    help="the gradients the backward computes (q or kv: one kernel of two)")
    ap.add_argument("--varlen", action="store_true", help="each case as one varlen batch (see above)")
    ap.add_argument("--cases", default=DEFAULT_CASES,
                    help="B:S:H:D[:c[:wW]],... (c = causal, H = Hq or Hq/Hkv, wW = left window W)")
    a = ap.parse_args()
    row = {"build": a.name}
    for text in a.cases.split(","):
        key, *case = parse_case(text)
        row[key] = measure(*case, a.bwd, a.flash, a.grads, a.varlen)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
