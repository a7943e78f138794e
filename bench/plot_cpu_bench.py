"""Plots orchard_bench's JSON (GFLOP/s vs seqlen; fwd, bwd panels) and prints a markdown table."""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def parse(name):
    """'BM_forward/float32/B:1/H:16/S:512/D:64/causal:0/real_time' -> ('BM_forward', fields)."""
    bm, *parts = name.split("/")
    fields = {"dtype": parts[0]} if parts and ":" not in parts[0] else {}
    fields.update(p.split(":", 1) for p in parts if ":" in p)
    return bm, fields


def load(path):
    """The best repetition of each benchmark (the machine may be shared: best = least disturbed)."""
    data = json.loads(Path(path).read_text())
    peaks, rows = {}, {}  # threads -> GFLOP/s; (dtype, D, causal, S, H) -> {bm: run}
    for run in data["benchmarks"]:
        if run.get("run_type", "iteration") != "iteration":
            continue
        bm, f = parse(run["name"])
        if bm == "BM_fma_peak":
            t = int(f["threads"])
            peaks[t] = max(peaks.get(t, 0), run["GFLOPs"])
        else:
            key = (f["dtype"], int(f["D"]), int(f["causal"]), int(f["S"]), int(f["H"]))
            best = rows.setdefault(key, {})
            if run["GFLOPs"] > best.get(bm, {}).get("GFLOPs", 0):
                best[bm] = run
    return data["context"], peaks, rows


def disturbed(run):
    """The benchmark's own thread also runs tasks, so it is busy all the wall time unless
    other processes took its core."""
    return run["cpu_time"] < 0.8 * run["real_time"]


def num(run, key, fmt):
    if key not in run:
        return "-"
    return format(run[key], fmt) + (" *" if disturbed(run) else "")


def ceiling(rows):
    """The peak that frac_peak divides by (measured once in the run), recovered from any result."""
    return next((r["GFLOPs"] / r["frac_peak"] for rs in rows.values() for r in rs.values()), 0)


def table(context, peaks, rows):
    lines = [
        f"Threads: {context.get('orchard_num_threads', '?')}; load average at the start: "
        f"{context.get('load_avg', '?')}; FMA peak (GFLOP/s): "
        + ", ".join(f"{t} thread(s) {g:.1f}" for t, g in sorted(peaks.items()))
    ]
    peak = ceiling(rows)
    lines.append(f"frac_peak is relative to {peak:.1f} GFLOP/s (measured in the run)")
    # On a quiet machine the peak scales with the threads and the two peak measurements agree.
    if peaks:
        threads, all_threads = max(peaks.items())
        if all_threads < 0.75 * threads * peaks[min(peaks)] or peak < 0.9 * all_threads:
            lines.append(
                "WARNING: the FMA peak does not scale with threads or is unstable: other work was "
                "running on this machine, and every number here is suspect."
            )
    lines += [
        "",
        "| dtype | D | causal | S | H | fwd GFLOP/s | bwd GFLOP/s | fwd frac | bwd frac |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dtype, d, causal, s, h), rs in rows.items():  # in the order of the run
        fwd, bwd = rs.get("BM_forward", {}), rs.get("BM_backward", {})
        lines.append(
            f"| {dtype} | {d} | {'yes' if causal else 'no'} | {s} | {h} | "
            f"{num(fwd, 'GFLOPs', '.1f')} | {num(bwd, 'GFLOPs', '.1f')} | "
            f"{num(fwd, 'frac_peak', '.2f')} | {num(bwd, 'frac_peak', '.2f')} |"
        )
    if any(disturbed(r) for rs in rows.values() for r in rs.values()):
        lines.append(
            "\n\\* disturbed: the benchmark's thread ran < 80% of the wall time "
            "(other processes on the machine)."
        )
    return "\n".join(lines)


def plot(context, rows, png):
    peak = ceiling(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    seqlens = sorted({k[3] for k in rows})
    colors = {}  # one colour per (dtype, D); causal runs dashed
    for ax, bm, title in zip(axes, ("BM_forward", "BM_backward"), ("forward", "backward")):
        for dtype, d, causal in dict.fromkeys(k[:3] for k in rows):
            pts = sorted(
                (k[3], rs[bm]["GFLOPs"])
                for k, rs in rows.items()
                if k[:3] == (dtype, d, causal) and bm in rs
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=colors.setdefault((dtype, d), f"C{len(colors)}"),
                linestyle="--" if causal else "-",
                label=f"{dtype} D={d}{' causal' if causal else ''}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [str(s) for s in seqlens])
        ax.axhline(peak, color="gray", linestyle=":")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seqlen (B * H * S = 8192)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("GFLOP/s")
    axes[1].legend(fontsize=8, loc="lower right")
    threads = context.get("orchard_num_threads", "?")
    fig.suptitle(f"Orchard CPU attention, {threads} threads; dotted: FMA peak {peak:.0f} GFLOP/s")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", help="orchard_bench --benchmark_out file")
    ap.add_argument("--png", help="plot file (default: the JSON's path with .png)")
    args = ap.parse_args()
    context, peaks, rows = load(args.json)
    print(table(context, peaks, rows))
    png = args.png or str(Path(args.json).with_suffix(".png"))
    plot(context, rows, png)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
