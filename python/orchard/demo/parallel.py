"""The demo's distributed modes, launched with torchrun: context parallel (every rank holds a
shard of every sequence; attention is orchard.distributed's ring attention) and data parallel
(DDP: every rank holds a slice of the batch). Rank 0 also trains the same model in one process on
the full batches, and the run fails unless both give the same losses step by step."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  before init_process_group: see _init
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import orchard
from orchard.demo.data import Batches, load_corpus
from orchard.demo.model import GPT, Config
from orchard.demo.train import DemoError, lr_at, pick_device, pick_dtype
from orchard.distributed import shard

# |parallel loss - one-process loss| allowed per step: rounding differs (the ring merges partial
# softmaxes; gradients are summed across ranks in another order) and AdamW carries it forward.
LOSS_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _init(args) -> torch.device:
    """Joins torchrun's process group (gloo on the CPU, NCCL on GPUs, with a timeout so that a
    failed rank ends the others); returns this rank's device."""
    if "RANK" not in os.environ:
        raise DemoError(f"--parallel {args.parallel} runs under torchrun, e.g. `torchrun "
                        f"--nproc-per-node 2 -m orchard demo --parallel {args.parallel}`")
    device = pick_device(args.device)
    if device.type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:
            raise DemoError(f"--parallel {args.parallel} on cuda needs a GPU per process: local "
                            f"rank {local_rank}, {gpus} GPU(s) on this host (--device cpu runs "
                            f"the processes on the CPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DemoError(f"--parallel needs cpu or cuda devices, not {device}")
    # torch._dynamo (imported by torch.optim's first use) keeps references to the default process
    # group when it is imported after init_process_group. destroy_process_group then cannot free
    # gloo's worker threads, and at exit one of them may release a tensor while the interpreter
    # finalizes, which aborts the process (torch 2.15; 1 run in 20 on 2 cores). This module
    # imports torch._dynamo first; tests/python/test_demo.py checks that the threads end.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    return device


class Run:
    """A model, its AdamW and the losses of its steps."""

    def __init__(self, model: GPT, args):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                     weight_decay=0.1)
        self.losses = []

    def step(self, lr: float, loss_of) -> torch.Tensor:
        """One optimiser step; loss_of() runs forward and backward and returns the loss."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of()
        self.opt.step()
        return loss


def train_parallel(args) -> dict:
    """Trains args.steps steps in the chosen mode on every rank; returns rank 0's summary."""
    device = _init(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        return _train(args, device, rank, world)
    finally:
        dist.destroy_process_group()


def _train(args, device, rank: int, world: int) -> dict:
    dtype = pick_dtype(args.dtype, device)
    context = args.parallel == "context"
    parts = (2 * world if args.layout == "zigzag" else world) if context else 1
    if args.seq_len % parts or (not context and args.batch_size % world):
        raise DemoError(f"--parallel {args.parallel} on {world} ranks needs --seq-len divisible "
                        f"by {parts} and --batch-size by {1 if context else world}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    name, corpus = load_corpus(args.data)
    batches = Batches(corpus, args.seq_len, args.batch_size, args.seed)
    config = Config(args.seq_len, args.layers, args.dim, args.heads, args.kv_heads, args.window,
                    attention="ring" if context else "orchard", ring_layout=args.layout)
    model = GPT(config).to(device, dtype)
    reference = None
    if rank == 0:
        reference = Run(GPT(dataclasses.replace(config, attention="orchard")).to(device, dtype),
                        args)
        reference.model.load_state_dict(model.state_dict())
    run = Run(model, args)
    ddp = None if context else DistributedDataParallel(model)
    per_rank = args.batch_size // world
    positions = shard(torch.arange(args.seq_len, device=device), dim=0, layout=args.layout)

    def parallel_loss(x, y):
        if context:
            # Each rank's mean over its tokens / W sums to the mean over the sequence; the
            # parameters' gradients are summed over the ranks (dK / dV already came back to
            # their owners through the ring).
            loss = model(shard(x, layout=args.layout), shard(y, layout=args.layout), positions)
            (loss / world).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
        else:
            # DDP averages the gradients of equal batch slices: the full batch's gradient.
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            loss = ddp(x[rows], y[rows])
            loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / world

    start = time.perf_counter()
    for step in range(args.steps):
        x, y = (t.to(device) for t in batches.train_batch(step))
        lr = lr_at(step, args.steps, args.lr)
        run.losses.append(run.step(lr, lambda: parallel_loss(x, y)).item())
        if reference is not None:
            def full_loss():
                loss = reference.model(x, y)
                loss.backward()
                return loss
            reference.losses.append(reference.step(lr, full_loss).item())
            if not args.quiet:
                print(f"step {step}: loss {run.losses[-1]:.6f} ({args.parallel} parallel, "
                      f"{world} ranks) vs {reference.losses[-1]:.6f} (one process)", flush=True)
    wall = time.perf_counter() - start

    # Rank 0 judges; every rank learns the verdict, so that all exit alike.
    gap = torch.zeros(1, dtype=torch.float64, device=device)
    if reference is not None:
        gap[0] = max(abs(a - b) for a, b in zip(run.losses, reference.losses))
    dist.broadcast(gap, src=0)
    tolerance = LOSS_TOL[dtype]
    summary = {"mode": args.parallel, "layout": args.layout if context else None,
               "world_size": world, "device": str(device.type), "dtype": str(dtype), "data": name,
               "args": vars(args), "losses": run.losses,
               "one_process_losses": reference.losses if reference else None,
               "max_abs_loss_diff": gap.item(), "tolerance": tolerance, "wall_s": wall,
               "versions": {"torch": torch.__version__, "orchard": orchard.__version__}}
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"parallel_{args.parallel}_summary.json").write_text(json.dumps(summary, indent=1))
        print(f"{args.parallel} parallel on {world} ranks vs one process, {args.steps} steps: "
              f"max loss difference {gap.item():.2e} (tolerance {tolerance:.0e}); wrote "
              f"{out / f'parallel_{args.parallel}_summary.json'}", flush=True)
    if not gap.item() <= tolerance:
        raise DemoError(f"{args.parallel} parallel losses differ from one process's by "
                        f"{gap.item():.3e} > {tolerance:.0e}")
    return summary
