"""The demo's run: gradient check, training on Orchard with checked counters, SDPA comparison."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import orchard
from orchard.demo.data import Batches, load_corpus
from orchard.demo.model import GPT, Config

STATS_KEY = {"cpu": "cpu", "cuda": "cuda", "mps": "metal"}  # torch device -> orchard.stats() key
GRAD_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
EVAL_BATCHES = 8


class DemoError(RuntimeError):
    """A check of the demo failed."""


def pick_device(name: str) -> torch.device:
    """auto -> cuda if available, else mps if available, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> float32 on cpu, bfloat16 on gpus."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def sync(device: torch.device) -> None:
    """Waits for queued GPU work so that timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def grad_errors(model: GPT, ref: GPT) -> dict[str, float]:
    """||g - g_ref|| / ||g_ref|| for every parameter (names of `model`)."""
    return {n: ((p.grad.double().cpu() - r.grad.double().cpu()).norm()
                / r.grad.double().cpu().norm().clamp_min(1e-30)).item()
            for (n, p), r in zip(model.named_parameters(), ref.parameters())}


def check_gradients(model: GPT, batches: Batches, device, dtype) -> dict:
    """Orchard's gradients on the first batch vs the same model with SDPA in float64 (on the
    CPU): fails unless Orchard's error is within 2x (plus a floor) of SDPA's in the same dtype,
    which measures the rounding of the rest of the model."""
    sdpa = copy.deepcopy(model)
    sdpa.set_attention("sdpa")
    ref = copy.deepcopy(sdpa).to("cpu", torch.float64)
    x, y = batches.train_batch(0)
    for m in (model, sdpa):
        m(x.to(device), y.to(device)).backward()
    ref(x, y).backward()
    result = {}
    for label, (a, b) in {"orchard_vs_float64": (model, ref), "sdpa_vs_float64": (sdpa, ref),
                          "orchard_vs_sdpa_same_dtype": (model, sdpa)}.items():
        errors = grad_errors(a, b)
        worst = max(errors, key=errors.get)
        result[label] = {"attention_params": max(e for n, e in errors.items() if ".attn." in n),
                         "all_params": errors[worst], "worst_param": worst}
    model.zero_grad(set_to_none=True)
    tolerance = 2 * result["sdpa_vs_float64"]["all_params"] + GRAD_FLOOR[dtype]
    result["tolerance"] = tolerance
    o, s = result["orchard_vs_float64"], result["sdpa_vs_float64"]
    name = str(dtype).removeprefix("torch.")
    print(f"gradient check, max relative error vs a float64 SDPA reference: Orchard attention "
          f"params {o['attention_params']:.2e}, all params {o['all_params']:.2e} (PyTorch SDPA in "
          f"{name}: {s['attention_params']:.2e}, {s['all_params']:.2e}); Orchard vs SDPA in "
          f"{name}: {result['orchard_vs_sdpa_same_dtype']['all_params']:.2e}; "
          f"tolerance {tolerance:.2e}", flush=True)
    if not o["all_params"] <= tolerance:
        raise DemoError(f"Orchard's gradients differ from the reference: relative error "
                        f"{o['all_params']:.3e} in {o['worst_param']} > {tolerance:.3e}")
    return result


class Trainer:
    """AdamW on one model with the demo's lr schedule; times each step."""

    def __init__(self, model: GPT, batches: Batches, total_steps: int, args, device):
        self.model, self.batches, self.total, self.args, self.device = (model, batches,
                                                                         total_steps, args, device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                     weight_decay=0.1)
        self.losses, self.times = [], []

    def step(self, step: int) -> None:
        """One optimiser step on training batch `step`."""
        x, y = (t.to(self.device) for t in self.batches.train_batch(step))
        sync(self.device)
        start = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.total, self.args.lr)
        loss = self.model(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())  # also waits for the step to finish
        self.times.append(time.perf_counter() - start)

    def tokens_per_s(self) -> float:
        return self.args.batch_size * self.args.seq_len * len(self.times) / sum(self.times)


def progress(steps: int, desc: str, quiet: bool):
    """A tqdm progress bar over range(steps) on stderr."""
    from tqdm import tqdm
    return tqdm(range(steps), desc=desc, disable=quiet, file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True)


def compare_with_sdpa(model: GPT, init: dict, batches: Batches, steps: int, args, device):
    """Trains copies of the model from the same initial weights with Orchard and with PyTorch
    SDPA, alternating step by step on the same batches, so that both see the same machine load.
    Returns both trainers."""
    runs = {}
    for impl in ("orchard", "sdpa"):
        m = copy.deepcopy(model)
        m.load_state_dict(init)
        m.set_attention(impl)
        runs[impl] = Trainer(m, batches, args.steps, args, device)
    bar = progress(steps, "orchard vs sdpa", args.quiet)
    for step in bar:
        for run in runs.values():
            run.step(step)
        bar.set_postfix(orchard=f"{runs['orchard'].losses[-1]:.3f}",
                        sdpa=f"{runs['sdpa'].losses[-1]:.3f}", refresh=False)
    return runs["orchard"], runs["sdpa"]


@torch.no_grad()
def evaluate(model: GPT, batches: Batches, device) -> float:
    """Mean loss over the fixed validation batches."""
    return sum(model(*(t.to(device) for t in batches.val_batch(i))).item()
               for i in range(EVAL_BATCHES)) / EVAL_BATCHES


def counter_snapshot(key: str) -> tuple[int, int, int, int]:
    """(forward, backward, forward fallbacks, backward fallbacks) counts on one backend."""
    s = orchard.stats()
    return (s["forward"][key], s["backward"][key], s["fallbacks"]["forward"],
            s["fallbacks"]["backward"])


def check_counters(before, after, layers: int, steps: int, key: str) -> dict:
    """Orchard's fused kernels ran once per layer and step in each direction, with no fallback."""
    fwd, bwd, fb_fwd, fb_bwd = (a - b for a, b in zip(after, before))
    expected = layers * steps
    result = {"backend": key, "forward": fwd, "backward": bwd, "expected": expected,
              "fallbacks": {"forward": fb_fwd, "backward": fb_bwd}, "checked": True}
    print(f"orchard.stats() on '{key}': forward +{fwd}, backward +{bwd} (expected {expected} = "
          f"{layers} layers x {steps} steps), fallbacks +{fb_fwd}/+{fb_bwd}", flush=True)
    if fwd != expected or bwd != expected or fb_fwd or fb_bwd:
        raise DemoError(f"Orchard's kernels did not run as expected: {result}")
    return result


def plot(path: Path, losses, sdpa_losses, val0, val1, title: str) -> None:
    """Writes the loss curves as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=0.8, label="train loss (Orchard)")
    if sdpa_losses:
        ax.plot(sdpa_losses, "--", lw=1.2, label="train loss (PyTorch SDPA)")
    ax.plot([0, len(losses) - 1], [val0, val1], "o", label="validation loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args) -> dict:
    """Runs the whole demo and returns its summary (also written as JSON)."""
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    wall = time.perf_counter()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.steps < 1 or args.dim % args.heads or args.heads % args.kv_heads:
        raise DemoError("need --steps >= 1, --dim divisible by --heads, --heads by --kv-heads")
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # Orchard's CPU pool follows PyTorch's setting
    torch.manual_seed(args.seed)
    name, corpus = load_corpus(args.data)
    batches = Batches(corpus, args.seq_len, args.batch_size, args.seed)
    log(f"data: {name}: {len(batches.train):,} train / {len(batches.val):,} validation bytes")
    config = Config(args.seq_len, args.layers, args.dim, args.heads, args.kv_heads, args.window)
    model = GPT(config).to(device, dtype)
    init = copy.deepcopy(model.state_dict())
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {args.layers} layers, "
        f"{args.heads} query / {args.kv_heads} kv heads, window {args.window}, {dtype}, {device}, "
        f"threads: {torch.get_num_threads()}")

    grads = check_gradients(model, batches, device, dtype)
    val0 = evaluate(model, batches, device)
    key = STATS_KEY[device.type]
    before = counter_snapshot(key)
    trainer = Trainer(model, batches, args.steps, args, device)
    bar = progress(args.steps, "orchard", args.quiet)
    for step in bar:
        trainer.step(step)
        bar.set_postfix(loss=f"{trainer.losses[-1]:.3f}", tok_s=f"{trainer.tokens_per_s():,.0f}",
                        refresh=False)
    losses = trainer.losses
    counters = check_counters(before, counter_snapshot(key), args.layers, args.steps, key)
    val1 = evaluate(model, batches, device)

    n = min(args.compare_steps, args.steps)
    tok_s, sdpa_losses, loss_gap, same = {"orchard_run": trainer.tokens_per_s()}, [], None, None
    if n > 0:
        orch, sdpa = compare_with_sdpa(model, init, batches, n, args, device)
        # Step 0 pays one-time costs: median step time over the later steps.
        timed = slice(1, n) if n > 1 else slice(0, n)
        tokens = args.batch_size * args.seq_len
        tok_s["orchard"] = tokens / statistics.median(orch.times[timed])
        tok_s["sdpa"] = tokens / statistics.median(sdpa.times[timed])
        sdpa_losses = sdpa.losses
        loss_gap = max(abs(a - b) for a, b in zip(orch.losses, sdpa_losses))
        same = orch.losses == losses[:n]  # the rerun from the same weights is reproducible

    k = min(10, len(losses))
    start_loss, end_loss = losses[0], sum(losses[-k:]) / k
    summary = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "data": name,
        "args": vars(args),
        "gradient_check": grads, "counters": counters,
        "loss": {"train_first_step": start_loss, f"train_last_{k}_steps": end_loss,
                 "val_initial": val0, "val_final": val1,
                 "max_abs_diff_orchard_vs_sdpa": loss_gap,
                 "orchard_rerun_bitwise_identical": same},
        "tokens_per_s": tok_s, "train_losses": losses, "sdpa_losses": sdpa_losses,
        "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
        "versions": {"torch": torch.__version__, "orchard": orchard.__version__},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "loss.png", losses, sdpa_losses, val0, val1,
         f"Orchard demo: {args.layers} layers, d={args.dim}, {device}, {summary['dtype']}")
    summary["wall_s"] = time.perf_counter() - wall
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"loss: train {start_loss:.3f} (first step) -> {end_loss:.3f} (mean of last {k}); "
          f"validation {val0:.3f} -> {val1:.3f}")
    print(f"tokens/s: Orchard {tok_s['orchard_run']:,.0f} over the {args.steps}-step run")
    if n > 0:
        print(f"Orchard vs PyTorch SDPA, same weights and batches, alternating steps, median of "
              f"steps {timed.start}..{n - 1}: {tok_s['orchard']:,.0f} vs {tok_s['sdpa']:,.0f} "
              f"tokens/s ({tok_s['orchard'] / tok_s['sdpa']:.2f}x); max loss difference "
              f"{loss_gap:.1e}; Orchard's rerun bitwise identical: {same}")
    print(f"wrote {out / 'loss.png'} and {out / 'summary.json'} ({summary['wall_s']:.1f} s)")
    if not (end_loss < (1 - args.min_drop) * start_loss and val1 < (1 - args.min_drop) * val0):
        raise DemoError(f"the loss did not fall by {args.min_drop:.0%}: train {start_loss:.3f} -> "
                        f"{end_loss:.3f}, validation {val0:.3f} -> {val1:.3f}")
    return summary
