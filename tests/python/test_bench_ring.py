"""bench/bench_ring.py end to end on CPU processes (gloo) at tiny sizes, so that the GPU
benchmark script is not dead code: it launches torchrun per W, checks the ring against one
device, and writes JSON (efficiencies for every W and S) and a PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_ring.py"


def test_bench_ring_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--worlds", "1", "2",
                           "--seqlens", "128", "256", "--heads", "4", "--kv-heads", "2",
                           "--head-dim", "16", "--dtype", "float32", "--reps", "1",
                           "--check-seqlen", "64", "--timeout", "60", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [json_path] = tmp_path.glob("ring-cpu-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 1000
    summary = json.loads(json_path.read_text())
    assert {(r["world"], r["seqlen"]) for r in summary["results"]} == \
        {(w, s) for w in (1, 2) for s in (128, 256)}
    for r in summary["results"]:
        for key in ("ring_fwd_s", "ring_fwd_bwd_s", "efficiency_fwd", "efficiency_fwd_bwd"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    for check in summary["checks"].values():
        assert check["ok"] and check["out"] < 1e-5 and check["seqlen"] == 64
