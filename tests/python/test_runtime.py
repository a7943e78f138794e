"""Gradients only where required, concurrent calls from Python threads, stats() counters and the
debug call log."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import orchard
import pytest
import torch
from helpers import GRAD_TOL, Config, assert_close, grads_of, leaves, randn, total_calls
from reference import attention_ref

CFG = Config(b=2, sq=21, sk=30, hq=4, hkv=2, d=16, causal=True)


@pytest.mark.parametrize("wanted", ["q", "k", "v", "qv", "kv"])
def test_gradients_only_for_inputs_that_require_them(wanted):
    q, k, v, dout = CFG.inputs(torch.float32)
    inputs = [t.requires_grad_(name in wanted) for name, t in zip("qkv", (q, k, v))]
    out = orchard.flash_attn_func(*inputs, causal=True)
    out.backward(dout)
    ref_inputs = leaves(q, k, v, dtype=torch.float64)
    ref_grads = grads_of(attention_ref(*ref_inputs, causal=True)[0], dout, ref_inputs)
    for name, t, g_ref in zip("qkv", inputs, ref_grads):
        if name in wanted:
            assert_close(f"d{name}", t.grad, g_ref, GRAD_TOL[torch.float32])
        else:
            assert t.grad is None


def test_no_input_requires_grad():
    q, k, v, _ = CFG.inputs(torch.float32)
    out = orchard.flash_attn_func(q, k, v)
    assert not out.requires_grad and out.grad_fn is None


def test_no_backward_call_without_grad():
    q, k, v, _ = CFG.inputs(torch.float32)
    before = orchard.stats()["backward"]["cpu"]
    with torch.no_grad():
        orchard.flash_attn_func(*leaves(q, k, v))
    assert orchard.stats()["backward"]["cpu"] == before


def _forward_backward(q, k, v, dout):
    inputs = leaves(q, k, v)
    out = orchard.flash_attn_func(*inputs, causal=True, softcap=4.0)
    return [out.detach(), *grads_of(out, dout, inputs)]


def test_threads_match_serial_calls():
    problems = [Config(b=2, sq=40 + 7 * i, sk=50, hq=4, hkv=2, d=32).inputs(torch.float32)
                for i in range(6)]
    serial = [_forward_backward(*p) for p in problems]
    with ThreadPoolExecutor(max_workers=len(problems)) as pool:
        concurrent = list(pool.map(lambda p: _forward_backward(*p), problems * 3))
    for got, expected in zip(concurrent, serial * 3):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_stats_count_calls_per_direction():
    q, k, v, dout = CFG.inputs(torch.float32)
    orchard.reset_stats()
    assert total_calls("forward") == total_calls("backward") == 0
    for _ in range(3):
        orchard.flash_attn_func(q, k, v)
    _forward_backward(q, k, v, dout)
    s = orchard.stats()
    assert s["forward"] == {"cpu": 4, "cuda": 0, "metal": 0, "reference": 0}
    assert s["backward"] == {"cpu": 1, "cuda": 0, "metal": 0, "reference": 0}
    assert s["fallbacks"] == {"forward": 0, "backward": 0}
    orchard.reset_stats()
    assert orchard.stats()["forward"]["cpu"] == 0


def test_call_log(call_log):
    q, k, v, dout = CFG.inputs(torch.float32)
    fwd_n, bwd_n = total_calls("forward") + 1, total_calls("backward") + 1
    _forward_backward(q, k, v, dout)
    lines = call_log.read_text().splitlines()
    assert len(lines) == 2
    fwd, bwd = lines
    assert fwd.startswith(f"FWD call={fwd_n} backend=cpu op=orchard.flash_attn_func ")
    assert bwd.startswith(f"BWD call={bwd_n} backend=cpu op=orchard.flash_attn_func ")
    fields = dict(re.findall(r"(\w+)=(\S+)", fwd))
    expected = {"B": "2", "Sq": "21", "Sk": "30", "Hq": "4", "Hkv": "2", "D": "16",
                "dtype": "float32", "softcap": "4", "fallback": "none"}
    assert {key: fields.get(key) for key in expected} == expected
    assert "window=(-1,0)" in fwd


def test_call_log_off_by_default(tmp_path, monkeypatch):
    path = tmp_path / "calls.log"
    monkeypatch.setenv("ORCHARD_LOG_FILE", str(path))
    monkeypatch.delenv("ORCHARD_DEBUG_FLASH_ATN", raising=False)
    orchard.flash_attn_func(randn(1, 4, 1, 8), randn(1, 4, 1, 8), randn(1, 4, 1, 8))
    assert not path.exists()


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_repeatable(deterministic):
    """The CPU backward is always deterministic: bitwise identical across runs."""
    q, k, v, dout = Config(b=2, sq=150, sk=130, hq=4, hkv=1, d=64).inputs(torch.float32)
    runs = []
    for _ in range(3):
        inputs = leaves(q, k, v)
        out = orchard.flash_attn_func(*inputs, deterministic=deterministic)
        runs.append([out, *grads_of(out, dout, inputs)])
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
