"""Orchard vs PyTorch's CPU SDPA (its flash-attention kernel), measured in the same run.

Forward, backward and forward+backward over sequence lengths, head dims 64 and 128, causal and
not, fp32 and bf16; FLOPs by DESIGN.md's formula; each figure also as a fraction of this run's
measured matmul ceiling (torch.matmul, same dtype). Each repetition times Orchard's call and then
SDPA's, so that a shared machine's drift over minutes hits both alike; figures are the median
over repetitions. Writes JSON and a PNG plot.

    python bench/bench_torch_cpu.py --out docs/bench [--dtypes float32] [--seqlens 512,1024]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    return statistics.median(seconds(fn) for _ in range(reps))


def matmul_ceiling(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: torch.matmul(a, b), 5) / 1e9


def attention_fns(impl: str, B: int, S: int, H: int, D: int, causal: bool, dtype):
    """(forward, backward) closures for one implementation, each in its native layout."""
    torch.manual_seed(0)
    if impl == "orchard":
        shape = (B, S, H, D)  # FlashAttention's layout

        def fwd(q, k, v):
            return orchard.flash_attn_func(q, k, v, causal=causal)
    else:
        shape = (B, H, S, D)  # SDPA's layout

        def fwd(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, dtype=dtype)

    def forward():
        with torch.no_grad():
            fwd(q, k, v)

    def backward():
        out = fwd(q, k, v)
        t0 = time.perf_counter()
        torch.autograd.grad(out, (q, k, v), dout)
        return time.perf_counter() - t0

    def fwd_bwd():
        torch.autograd.grad(fwd(q, k, v), (q, k, v), dout)

    return forward, backward, fwd_bwd


def measure(B, S, H, D, causal, dtype_name, reps):
    dtype = DTYPES[dtype_name]
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    row = {"B": B, "S": S, "H": H, "D": D, "causal": causal, "dtype": dtype_name}
    impls = ("orchard", "sdpa")
    fns = {impl: attention_fns(impl, B, S, H, D, causal, dtype) for impl in impls}
    times = {impl: {"fwd": [], "bwd": [], "fwd_bwd": []} for impl in impls}
    for forward, backward, fwd_bwd in fns.values():  # warm-up
        forward(), backward(), fwd_bwd()
    for _ in range(reps):  # the two implementations alternate within each repetition
        for impl, (forward, backward, fwd_bwd) in fns.items():
            times[impl]["fwd"].append(seconds(forward))
            times[impl]["bwd"].append(backward())
            times[impl]["fwd_bwd"].append(seconds(fwd_bwd))
    for impl in impls:
        t_fwd, t_bwd, t_all = (statistics.median(times[impl][k]) for k in ("fwd", "bwd", "fwd_bwd"))
        row[impl] = {"fwd_s": t_fwd, "bwd_s": t_bwd, "fwd_bwd_s": t_all,
                     "fwd_gflops": flops / t_fwd / 1e9, "bwd_gflops": 2.5 * flops / t_bwd / 1e9,
                     "fwd_bwd_gflops": 3.5 * flops / t_all / 1e9}
    for k in ("fwd", "bwd", "fwd_bwd"):
        row[f"speedup_{k}"] = row["sdpa"][f"{k}_s"] / row["orchard"][f"{k}_s"]
    return row


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    configs = sorted({(r["dtype"], r["D"], r["causal"]) for r in rows})
    for ax, key in zip(axes, ("fwd", "bwd", "fwd_bwd")):
        for dtype, D, causal in configs:
            rs = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, D, causal)]
            ax.plot([r["S"] for r in rs], [r[f"speedup_{key}"] for r in rs], marker="o",
                    label=f"{dtype} d={D}{' causal' if causal else ''}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key}: Orchard speed-up over SDPA (CPU)")
        ax.set_xlabel("sequence length")
    axes[0].set_ylabel("SDPA time / Orchard time")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(rows) -> str:
    """GFLOP/s of Orchard and SDPA, and Orchard's speed-up, per configuration."""
    lines = ["| dtype | D | causal | S | fwd Orchard / SDPA (x) | bwd Orchard / SDPA (x) | "
             "fwd+bwd (x) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p = r["orchard"], r["sdpa"]
        lines.append(
            f"| {r['dtype']} | {r['D']} | {'yes' if r['causal'] else 'no'} | {r['S']} | "
            f"{o['fwd_gflops']:.0f} / {p['fwd_gflops']:.0f} ({r['speedup_fwd']:.2f}) | "
            f"{o['bwd_gflops']:.0f} / {p['bwd_gflops']:.0f} ({r['speedup_bwd']:.2f}) | "
            f"{r['speedup_fwd_bwd']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--seqlens", default="512,1024,2048,4096")
    parser.add_argument("--tokens", type=int, default=8192, help="B * S per measurement")
    parser.add_argument("--hidden", type=int, default=1024, help="H * D per measurement")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset")
    parser.add_argument("--table", help="print the markdown table of a JSON this script wrote")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())["rows"]))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dtypes = args.dtypes.split(",")
    unknown = [name for name in dtypes if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: {unknown} not among {list(DTYPES)}")
    ceilings = {name: matmul_ceiling(DTYPES[name]) for name in dtypes}
    rows = []
    for S in map(int, args.seqlens.split(",")):
        for D in (64, 128):
            for causal in (False, True):
                for dtype_name in dtypes:
                    B, H = max(1, args.tokens // S), args.hidden // D
                    row = measure(B, S, H, D, causal, dtype_name, args.reps)
                    for impl in ("orchard", "sdpa"):
                        for k in ("fwd", "bwd", "fwd_bwd"):
                            row[impl][f"{k}_frac_ceiling"] = (row[impl][f"{k}_gflops"]
                                                              / ceilings[dtype_name])
                    rows.append(row)
                    print(f"S={S:5d} D={D:3d} causal={causal:d} {dtype_name:8s} "
                          f"fwd {row['orchard']['fwd_gflops']:6.1f} vs {row['sdpa']['fwd_gflops']:6.1f}"
                          f"  bwd {row['orchard']['bwd_gflops']:6.1f} vs {row['sdpa']['bwd_gflops']:6.1f}"
                          f"  GFLOP/s  speed-up fwd {row['speedup_fwd']:.2f} bwd "
                          f"{row['speedup_bwd']:.2f}", flush=True)

    stamp = datetime.date.today().isoformat()
    result = {
        "date": stamp, "device": platform.processor() or platform.machine(),
        "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "orchard": orchard.__version__, "matmul_ceiling_gflops": ceilings,
        "flops": "fwd 4*B*H*S*S*D (halved when causal), bwd 2.5x fwd", "rows": rows,
    }
    (out / f"cpu-sdpa-{stamp}.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / f"cpu-sdpa-{stamp}.png")
    print(markdown_table(rows))
    print(f"wrote {out}/cpu-sdpa-{stamp}.json and .png")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
