"""`python -m orchard demo` end to end at tiny sizes: exit status, PNG, JSON, checked counters;
its torchrun modes (context and data parallel) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TINY = ["--steps", "5", "--seq-len", "32", "--batch-size", "4", "--layers", "2", "--dim", "32",
        "--heads", "4", "--kv-heads", "2", "--compare-steps", "3", "--min-drop", "0", "--quiet"]


def run_demo(tmp_path, *extra):
    """Runs the demo in a subprocess; returns (completed process, summary dict)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orchard", "demo", *TINY, "--out", str(out),
                           *extra], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "loss.png").stat().st_size > 1000
    return proc, json.loads((out / "summary.json").read_text())


def test_demo_default_corpus(tmp_path):
    # On the CPU whatever the host has (the GPU demo runs in tools/gpu_check.sh): the thresholds
    # below are fp32's.
    proc, summary = run_demo(tmp_path, "--device", "cpu")
    counters = summary["counters"]
    assert counters["checked"] and counters["backend"] == "cpu"
    assert counters["forward"] == counters["backward"] == counters["expected"] == 2 * 5
    assert counters["fallbacks"] == {"forward": 0, "backward": 0}
    assert "orchard.stats() on 'cpu': forward +10, backward +10" in proc.stdout
    assert summary["gradient_check"]["orchard_vs_sdpa_same_dtype"]["all_params"] < 1e-4
    assert summary["loss"]["max_abs_diff_orchard_vs_sdpa"] < 1e-3
    assert len(summary["train_losses"]) == 5 and len(summary["sdpa_losses"]) == 3
    assert summary["loss"]["orchard_rerun_bitwise_identical"] is True
    assert set(summary["tokens_per_s"]) == {"orchard_run", "orchard", "sdpa"}


def test_demo_file_window_and_failure(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    _, summary = run_demo(tmp_path, "--data", str(corpus), "--window", "8")
    assert summary["data"] == str(corpus) and summary["args"]["window"] == 8
    # An impossible loss target must fail loudly with a non-zero exit status.
    bad = subprocess.run([sys.executable, "-m", "orchard", "demo", *TINY, "--min-drop", "0.99",
                          "--data", str(corpus), "--out", str(tmp_path / "bad")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAILED: the loss did not fall" in bad.stdout


def test_demo_fails_loudly_on_wrong_gradients(tmp_path, monkeypatch, capsys):
    import orchard
    from orchard.__main__ import main

    real = orchard.flash_attn_func
    monkeypatch.setattr(orchard, "flash_attn_func", lambda *a, **kw: real(*a, **kw) * 1.01)
    # On the CPU (fp32): a GPU host's demo runs in bf16, whose tolerance a 1% error stays within.
    assert main(["demo", *TINY, "--device", "cpu", "--threads", "0", "--out", str(tmp_path)]) == 1
    assert "FAILED: Orchard's gradients differ from the reference" in capsys.readouterr().out


# Runs the demo's command line in a torchrun rank, then fails (status 3) if the rank has more
# threads after destroy_process_group than it had just before init_process_group: the group's
# gloo workers must be gone, or one of them may abort the process at exit (see _init in
# orchard/demo/parallel.py). Counting at those two calls leaves out threads that torch or a GPU
# driver start beforehand.
RANK_SCRIPT = """
import os, sys
import torch.distributed as dist
from orchard.__main__ import main
threads = lambda: len(os.listdir("/proc/self/task"))
counts = {}
init, destroy = dist.init_process_group, dist.destroy_process_group
def counted_init(*args, **kwargs):
    counts["before"] = threads()
    return init(*args, **kwargs)
def counted_destroy(*args, **kwargs):
    destroy(*args, **kwargs)
    counts["after"] = threads()
dist.init_process_group, dist.destroy_process_group = counted_init, counted_destroy
status = main(sys.argv[1:])
if counts["after"] > counts["before"]:
    print(f"rank {os.environ['RANK']}: {counts['after'] - counts['before']} thread(s) outlive "
          f"the demo's process group", file=sys.stderr)
    sys.exit(3)
sys.exit(status)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("mode, extra", [("context", ["--layout", "zigzag", "--window", "9"]),
                                         ("data", [])])
def test_demo_parallel_matches_one_process(tmp_path, mode, extra):
    """`torchrun -m orchard demo --parallel ...` on 2 CPU processes (gloo): the same losses as
    one process training the same model on the same full batches (checked by the demo), and no
    thread of the process group left when the demo returns."""
    out = tmp_path / "out"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), "demo", *TINY,
                           "--parallel", mode, *extra, "--device", "cpu", "--timeout", "60",
                           "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / f"parallel_{mode}_summary.json").read_text())
    assert summary["mode"] == mode and summary["world_size"] == 2
    assert len(summary["losses"]) == len(summary["one_process_losses"]) == 5
    assert summary["max_abs_loss_diff"] <= summary["tolerance"] == 1e-4
    assert f"{mode} parallel on 2 ranks vs one process, 5 steps" in proc.stdout
