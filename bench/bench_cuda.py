"""Orchard's CUDA kernels vs PyTorch SDPA's flash (FlashAttention 2) and cuDNN backends, measured
in the same run on the same GPU.

Shapes: FlashAttention's benchmark (bf16, B x S = 16k tokens, Hq x D = 2048, hdim 64 and 128,
causal and not, seqlen 512..16k) and the models our users fine-tune: StarCoder2-3B (Hq 24,
Hkv 2, D 128, causal, sliding window 4096, S 4k..16k) and Phi-2 (H 32, D 80, causal, S 2k).
FLOPs by DESIGN.md's formula over the (query, key) pairs actually visible (a window visits
fewer); backward = 2.5 x forward. Each figure is also a fraction of this run's measured bf16
matmul ceiling. Peers get k/v expanded to Hq heads where they need it (not timed) and run full
causal where they cannot express a window (their FLOPs are counted for what they compute).

    python bench/bench_cuda.py --out $OUT            # writes cuda-sdpa-<date>.json and .png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard
from orchard import _ops

PEERS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


# How cuda_time times a call: "queued" (the default) records a pair of CUDA events around each
# call without waiting between calls, so the host issues the next call while the GPU runs this
# one and each pair measures the GPU's time for the call, as in a training step (and triton's
# do_bench); "sync_each" waits for each call to finish before issuing the next, so each figure
# also holds the host's time to issue the call (dispatch, validation, tensor maps), during
# which the GPU idles. Both are reported where bench_cuda.py runs twice (PERFORMANCE.md).
TIMING = "queued"


def cuda_time(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of fn() over reps runs, timed with CUDA events (see TIMING)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
        if TIMING == "sync_each":
            end.synchronize()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) / 1e3 for start, end in pairs)
    return times[len(times) // 2]


def matmul_ceiling() -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / cuda_time(lambda: a @ b, reps=10) / 1e12


def visible_pairs(S: int, causal: bool, window: int) -> int:
    """(query, key) pairs of one head: S^2, S(S+1)/2 causal, fewer with a left window."""
    if not causal:
        return S * S
    if window < 0 or window >= S:
        return S * (S + 1) // 2
    w = window + 1  # keys per row once the window is full
    return w * (w + 1) // 2 + (S - w) * w


def measure(case: dict) -> dict:
    B, S, Hq, Hkv, D = case["B"], case["S"], case["Hq"], case["Hkv"], case["D"]
    causal, window = case["causal"], case.get("window", -1)
    torch.manual_seed(0)
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    row = dict(case)
    flops = 4 * B * Hq * D * visible_pairs(S, causal, window)

    # Orchard: the ops themselves (forward; backward from the saved out / lse).
    opts = (None, None, 0, 0, 0.0, None, causal, window if causal else -1, 0 if causal else -1,
            0.0, None, torch.zeros(2, dtype=torch.int64), False, "bench")
    # "orchard" is what a user gets (the wgmma kernels on Hopper), "orchard_mma" the mma.sync
    # kernels every sm_80+ GPU runs (ORCHARD_CUDA_WGMMA=0, read by the backend on each call).
    for impl, wgmma in (("orchard", "1"), ("orchard_mma", "0")):
        os.environ["ORCHARD_CUDA_WGMMA"] = wgmma
        out, lse = _ops.ops.fwd(q, k, v, *opts)
        bwd_args = (dout, q, k, v, out, lse, *opts[:-1], True, True, True, "bench")
        t_fwd = cuda_time(lambda: _ops.ops.fwd(q, k, v, *opts))
        t_bwd = cuda_time(lambda: _ops.ops.bwd(*bwd_args))
        row[impl] = {"fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3,
                     "fwd_tflops": flops / t_fwd / 1e12, "bwd_tflops": 2.5 * flops / t_bwd / 1e12}
        if impl == "orchard":  # deterministic=True: on Hopper the two-kernel backward, no atomics
            det_args = (*bwd_args[:18], True, *bwd_args[19:])
            t_det = cuda_time(lambda: _ops.ops.bwd(*det_args))
            row[impl] |= {"bwd_det_ms": t_det * 1e3, "bwd_det_tflops": 2.5 * flops / t_det / 1e12}
    os.environ.pop("ORCHARD_CUDA_WGMMA")

    # Peers: (B, H, S, D) views, k/v expanded to Hq heads, full causal.
    peer_flops = 4 * B * Hq * D * visible_pairs(S, causal, -1)
    qt = q.transpose(1, 2).detach().requires_grad_()
    kt, vt = ((x.repeat_interleave(Hq // Hkv, dim=2) if Hq != Hkv else x).transpose(1, 2)
              .detach().requires_grad_() for x in (k, v))
    dt = dout.transpose(1, 2)
    for name, backend in PEERS.items():
        try:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                f = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)  # noqa: E731
                tf = cuda_time(f)
                tb = cuda_time(lambda: torch.autograd.grad(o, (qt, kt, vt), dt, retain_graph=True))
            row[name] = {"fwd_ms": tf * 1e3, "bwd_ms": tb * 1e3, "fwd_tflops": peer_flops / tf / 1e12,
                         "bwd_tflops": 2.5 * peer_flops / tb / 1e12}
        except RuntimeError as e:  # a backend that cannot run this shape
            row[name] = {"error": str(e).split("\n")[0][:200]}
    return row


def cases(quick: bool) -> list[dict]:
    out = []
    seqlens = [512, 1024, 2048, 4096, 8192, 16384] if not quick else [1024, 4096]
    for D in (64, 128):
        for causal in (False, True):
            for S in seqlens:
                out.append({"name": f"fa_d{D}{'_causal' if causal else ''}", "B": 16384 // S, "S": S,
                            "Hq": 2048 // D, "Hkv": 2048 // D, "D": D, "causal": causal})
    for causal in (False, True):  # FlashAttention 3's third head dim (Gemma's), fewer lengths
        for S in ([1024, 4096, 16384] if not quick else [4096]):
            out.append({"name": f"fa_d256{'_causal' if causal else ''}", "B": 16384 // S, "S": S,
                        "Hq": 8, "Hkv": 8, "D": 256, "causal": causal})
    for S in ([4096, 8192, 16384] if not quick else [8192]):
        out.append({"name": "starcoder2_3b", "B": max(1, 16384 // S), "S": S, "Hq": 24, "Hkv": 2,
                    "D": 128, "causal": True, "window": 4096})
    out.append({"name": "phi2", "B": 8, "S": 2048, "Hq": 32, "Hkv": 32, "D": 80, "causal": True})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fa = [r for r in rows if r["name"].startswith("fa_")]
    names = sorted({r["name"] for r in fa})
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        rs = [r for r in fa if r["name"] == name]
        for row_i, direction in enumerate(("fwd", "bwd")):
            ax = axes[row_i][col]
            for impl in ("orchard", "orchard_mma", *PEERS):
                pts = [(r["S"], r[impl][f"{direction}_tflops"]) for r in rs if "error" not in r[impl]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name} {direction}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(path: Path, bwd_key: str = "bwd") -> str:
    """A markdown table of a JSON this script wrote (TFLOP/s; x = Orchard / peer)."""
    data = json.loads(path.read_text())
    ceiling = data["meta"]["matmul_ceiling_tflops"]
    mma = "orchard_mma" in data["rows"][0]  # JSONs from before the wgmma kernels lack it
    lines = ["| case | S | Orchard fwd / bwd | of ceiling | " + ("mma.sync fwd / bwd | " if mma else "")
             + "flash fwd / bwd | x flash | cuDNN fwd / bwd | x cuDNN |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if mma else "")]
    for r in data["rows"]:
        o = r["orchard"]
        of, ob = o["fwd_tflops"], o[f"{bwd_key}_tflops"]
        cells = [r["name"], str(r["S"]), f"{of:.0f} / {ob:.0f}", f"{of / ceiling:.2f} / {ob / ceiling:.2f}"]
        if mma:
            cells.append(f"{r['orchard_mma']['fwd_tflops']:.0f} / {r['orchard_mma']['bwd_tflops']:.0f}")
        for peer in PEERS:
            p = r[peer]
            if "error" in p:
                cells += ["n/a", "n/a"]
            else:
                cells += [f"{p['fwd_tflops']:.0f} / {p['bwd_tflops']:.0f}",
                          f"{of / p['fwd_tflops']:.2f} / {ob / p['bwd_tflops']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    ap.add_argument("--table", type=Path, help="print a markdown table of this JSON and exit")
    ap.add_argument("--bwd-key", default="bwd", help="with --table: the backward column to show")
    ap.add_argument("--timing", choices=("queued", "sync_each"), default="queued",
                    help="how each call is timed (TIMING above); sync_each writes *-sync.json")
    args = ap.parse_args()
    if args.table:
        print(table(args.table, args.bwd_key))
        return
    global TIMING
    TIMING = args.timing
    ceiling = matmul_ceiling()
    rows = []
    for case in cases(args.quick):
        row = measure(case)
        rows.append(row)
        o = row["orchard"]
        peers = " ".join(f"{n} {row[n].get('fwd_tflops', float('nan')):5.0f}/{row[n].get('bwd_tflops', float('nan')):5.0f}"
                         for n in PEERS)
        m = row["orchard_mma"]
        print(f"{row['name']:16s} S={row['S']:6d} orchard {o['fwd_tflops']:5.0f}/{o['bwd_tflops']:5.0f} "
              f"({o['fwd_tflops'] / ceiling:.2f}/{o['bwd_tflops'] / ceiling:.2f} of ceiling)  "
              f"det bwd {o['bwd_det_tflops']:5.0f}  mma {m['fwd_tflops']:5.0f}/{m['bwd_tflops']:5.0f}  {peers}",
              flush=True)
    stamp = datetime.date.today().isoformat()
    meta = {"date": stamp, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "matmul_ceiling_tflops": ceiling,
            "orchard": orchard.__version__ if hasattr(orchard, "__version__") else "dev",
            "flops": "4*B*Hq*D*visible pairs fwd, 2.5x bwd (peers: full causal pairs)",
            "timing": TIMING}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"cuda-sdpa-{stamp}" + ("-sync" if TIMING == "sync_each" else "")
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / f"{name}.png")
    print(f"matmul ceiling {ceiling:.0f} TFLOP/s; wrote {args.out}")


if __name__ == "__main__":
    main()
