"""Train a small byte-level GPT whose attention runs on Orchard, checked against PyTorch SDPA."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declares the demo's options on an argparse parser."""
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, else mps, else cpu), cpu, cuda or mps")
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--window", type=int, default=-1,
                   help="sliding window: each position sees itself and N earlier ones (-1: all)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on the cpu, bfloat16 on gpus")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int, default=0, help="for torch.manual_seed and the batches")
    p.add_argument("--data", default=None,
                   help="a text file, a folder, or a git repository (its tracked files); "
                        "none: Python's standard library")
    p.add_argument("--out", default="orchard_demo_out", help="folder for the PNG and JSON")
    p.add_argument("--compare-steps", type=int, default=20,
                   help="steps trained with PyTorch SDPA for the speed comparison (0: skip)")
    p.add_argument("--min-drop", type=float, default=0.2,
                   help="fail unless the final loss is this fraction below the initial one")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for PyTorch, whose threads Orchard's kernels run on "
                        "(0: PyTorch's default, all cores)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, only the checks and the summary")
    p.add_argument("--parallel", default="none", choices=["none", "context", "data"],
                   help="under torchrun: context (ring attention over sequence shards) or data "
                        "(DDP) parallel training, checked against one process's losses")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"],
                   help="how --parallel context shards the sequence")
    p.add_argument("--timeout", type=float, default=300,
                   help="--parallel: seconds a rank waits for the others before failing")


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns 0 on success, 1 when a check failed."""
    from orchard.demo.train import DemoError, train

    try:
        if args.parallel == "none":
            train(args)
        else:
            from orchard.demo.parallel import train_parallel

            train_parallel(args)
    except DemoError as e:
        print(f"orchard demo: FAILED: {e}", flush=True)
        return 1
    return 0
