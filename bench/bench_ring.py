"""Ring attention scaling over GPUs (orchard.distributed, NCCL): time of causal attention over a
total sequence S on W = 1, 2, 4 ranks, and per-rank efficiency = (one-device time) / (W x W-rank
time), for the forward and forward+backward. The one-device time is orchard.flash_attn_func on
the whole sequence (measured in the W = 1 run, next to the ring on one rank). Before timing, each
W checks the ring against one device (output and gradients, DESIGN.md's thresholds) at
--check-seqlen. Writes JSON and a PNG.

Default shapes are StarCoder2-3B's attention (Hq 24, Hkv 2, D 128), B = 1, bf16, zigzag layout:

    python bench/bench_ring.py --out docs/bench                      # needs 4 GPUs

Each W runs as `torchrun --standalone --nproc-per-node W bench/bench_ring.py --worker ...`. The
same code runs on CPUs with gloo (one thread per rank) as a smoke check of the script:

    python bench/bench_ring.py --device cpu --worlds 1 2 --seqlens 256 512 --heads 4 \\
        --kv-heads 2 --head-dim 32 --dtype float32 --reps 1 --check-seqlen 64 --out /tmp/ring
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import orchard
from orchard.distributed import ring_flash_attn_func, shard

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}  # DESIGN.md, outputs


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--reps", type=int, default=5, help="timed runs (median) after one warm-up")
    p.add_argument("--check-seqlen", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=600, help="process group timeout (s)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON path of one W's run
    return p.parse_args(argv)


# ---- one W, under torchrun --------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device) -> float:
    """Median over reps of the slowest rank's seconds for fn(), after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(args, device, dtype) -> dict:
    """Ring vs one device on the same full tensors at --check-seqlen: the largest relative
    error over the ranks' shards of out, dq, dk, dv."""
    S = args.check_seqlen
    g = torch.Generator().manual_seed(0)
    shapes = [(args.batch, S, args.heads, args.head_dim)] + \
        [(args.batch, S, args.kv_heads, args.head_dim)] * 2 + \
        [(args.batch, S, args.heads, args.head_dim)]
    q, k, v, dout = (torch.randn(s, generator=g).to(device, dtype) for s in shapes)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = orchard.flash_attn_func(*full, causal=True)
    out.backward(dout)
    local = [shard(t, layout=args.layout).requires_grad_() for t in (q, k, v)]
    out_r = ring_flash_attn_func(*local, causal=True, layout=args.layout)
    out_r.backward(shard(dout, layout=args.layout))
    errors = torch.tensor([rel_err(out_r, shard(out, layout=args.layout))] +
                          [rel_err(a.grad, shard(b.grad, layout=args.layout))
                           for a, b in zip(local, full)], dtype=torch.float64, device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    result = dict(zip(("out", "dq", "dk", "dv"), errors.tolist()))
    result["seqlen"] = S
    result["ok"] = result["out"] <= TOL[dtype] and max(errors[1:].tolist()) <= 3 * TOL[dtype]
    return result


def worker(args) -> None:
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # one core per rank: W ranks use W cores
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    run = {"world": world, "check": check(args, device, dtype), "results": []}
    if not run["check"]["ok"]:
        raise SystemExit(f"bench_ring: the ring differs from one device: {run['check']}")
    B, Hq, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    for S in args.seqlens:
        s_local = S // world
        q = torch.randn(B, s_local, Hq, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, s_local, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, s_local, Hkv, D, device=device, dtype=dtype, requires_grad=True)
        dout = torch.randn(B, s_local, Hq, D, device=device, dtype=dtype)

        def ring_fwd():
            with torch.no_grad():
                ring_flash_attn_func(q, k, v, causal=True, layout=args.layout)

        def ring_fwd_bwd():
            torch.autograd.grad(ring_flash_attn_func(q, k, v, causal=True, layout=args.layout),
                                (q, k, v), dout)

        row = {"seqlen": S, "ring_fwd_s": timed(ring_fwd, args.reps, device),
               "ring_fwd_bwd_s": timed(ring_fwd_bwd, args.reps, device)}
        if world == 1:  # the one-device baseline: the plain op on the whole sequence

            def one_fwd():
                with torch.no_grad():
                    orchard.flash_attn_func(q, k, v, causal=True)

            def one_fwd_bwd():
                torch.autograd.grad(orchard.flash_attn_func(q, k, v, causal=True), (q, k, v),
                                    dout)

            row["one_device_fwd_s"] = timed(one_fwd, args.reps, device)
            row["one_device_fwd_bwd_s"] = timed(one_fwd_bwd, args.reps, device)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        run["results"].append(row)
        del q, k, v, dout
    if rank == 0:
        Path(args.worker).write_text(json.dumps(run))
    dist.destroy_process_group()


# ---- the driver: one torchrun per W, then efficiency, JSON and PNG ----------------------------


def launch(args, world: int, path: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(world), __file__, *sys.argv[1:], "--worker", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else None
    subprocess.run(cmd, check=True, env=env)
    return json.loads(path.read_text())


def flops(B: int, S: int, Hq: int, D: int) -> float:
    """DESIGN.md's forward FLOPs, causal (halved)."""
    return 4 * B * Hq * S * S * D / 2


def plot(path: Path, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(axes, ("efficiency_fwd", "efficiency_fwd_bwd"),
                              ("forward", "forward + backward")):
        for world in sorted({r["world"] for r in summary["results"]}):
            rows = [r for r in summary["results"] if r["world"] == world]
            ax.plot([r["seqlen"] for r in rows], [r[key] for r in rows], "o-", label=f"W = {world}")
        ax.axhline(0.85, color="grey", ls=":", label="goal 0.85")
        seqlens = sorted({r["seqlen"] for r in summary["results"]})
        ax.set(xscale="log", xlabel="total sequence length S", title=title, ylim=(0, 1.1))
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-rank efficiency  T1 / (W * TW)")
    axes[1].legend()
    s = summary["shapes"]
    fig.suptitle(f"Orchard ring attention ({summary['layout']}), {summary['device']}, "
                 f"Hq {s['Hq']} Hkv {s['Hkv']} D {s['D']}, {summary['dtype']}, causal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def driver(args) -> None:
    if 1 not in args.worlds:
        raise SystemExit("bench_ring: --worlds must include 1 (the one-device baseline)")
    for S in args.seqlens + [args.check_seqlen]:
        for world in args.worlds:
            if S % (2 * world):
                raise SystemExit(f"bench_ring: S = {S} does not split into 2 x {world} chunks")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in sorted(args.worlds):
            runs[world] = launch(args, world, Path(tmp) / f"w{world}.json")
    base = {r["seqlen"]: r for r in runs[1]["results"]}
    results = []
    for world, run in sorted(runs.items()):
        for r in run["results"]:
            one = base[r["seqlen"]]
            f = flops(args.batch, r["seqlen"], args.heads, args.head_dim)
            results.append({**r, "world": world,
                            "efficiency_fwd": one["one_device_fwd_s"] / (world * r["ring_fwd_s"]),
                            "efficiency_fwd_bwd": one["one_device_fwd_bwd_s"]
                            / (world * r["ring_fwd_bwd_s"]),
                            "ring_fwd_tflops_per_rank": f / r["ring_fwd_s"] / world / 1e12,
                            "ring_fwd_bwd_tflops_per_rank": 3.5 * f / r["ring_fwd_bwd_s"]
                            / world / 1e12})
    device = (torch.cuda.get_device_name(0) if args.device == "cuda"
              else f"CPU ({platform.processor() or platform.machine()}), 1 thread per rank, gloo")
    summary = {"date": datetime.date.today().isoformat(), "device": device,
               "dtype": args.dtype, "layout": args.layout,
               "shapes": {"B": args.batch, "Hq": args.heads, "Hkv": args.kv_heads,
                          "D": args.head_dim, "causal": True},
               "reps": args.reps, "checks": {w: run["check"] for w, run in runs.items()},
               "results": results,
               "versions": {"torch": torch.__version__, "orchard": orchard.__version__,
                            "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                            if args.device == "cuda" else None}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ring-{args.device}-{summary['date']}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    plot(out / f"{stem}.png", summary)
    for r in results:
        print(f"W={r['world']} S={r['seqlen']}: fwd {r['ring_fwd_s'] * 1e3:.1f} ms "
              f"(efficiency {r['efficiency_fwd']:.2f}), fwd+bwd {r['ring_fwd_bwd_s'] * 1e3:.1f} ms "
              f"(efficiency {r['efficiency_fwd_bwd']:.2f})")
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    arguments = parse()
    if arguments.worker:
        worker(arguments)
    else:
        driver(arguments)
