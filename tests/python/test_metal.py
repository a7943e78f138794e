"""The PyTorch MPS path of the Metal backend (orchard.metal): what can be checked without an
Apple GPU here (the single MSL source compile_shader gets), and the kernels against the
float64 reference where MPS exists (the macOS CI job)."""

from __future__ import annotations

import re

import pytest
import torch

import orchard
from orchard import _ops, metal

from reference import attention_ref

MPS = torch.backends.mps.is_available()


def test_inlined_source_is_self_contained():
    source = metal.inline_source(metal.source_root())
    # compile_shader has no include path: only <metal_stdlib> may remain.
    assert re.findall(r'#\s*include\s+"', source) == []
    assert "#pragma once" not in source
    names = set(re.findall(r'host_name\("([a-z_]+)" #T(?: "_" #DMAX)?\)', source))
    assert names == {"attention_fwd_", "attention_bwd_dkdv_", "attention_bwd_dq_",
                     "attention_bwd_preprocess_"}
    # The shared definitions appear once each: Philox and the window bounds from src/core.
    assert source.count("Philox4 philox4x32_10(") == 1
    assert source.count("Span visible_keys(") == 1


def test_plan_op_is_validated_by_the_core():
    # The launch plan of the MPS path goes through orchard::forward's validation on
    # Backend::metal; CPU tensors are refused there, which is what can be run without MPS.
    q, k, v, out = (torch.randn(1, 4, 1, 16) for _ in range(4))
    lse = torch.empty(1, 1, 4)
    with pytest.raises(ValueError, match="orchard.test: backend metal needs metal tensors but q "
                                         "is on cpu"):
        _ops.call(_ops.ops.metal_plan_fwd, q, k, v, out, lse, None, None, 0, 0, 0.0, None, False,
                  -1, -1, 0.0, None, torch.zeros(2, dtype=torch.int64), False, "orchard.test")


@pytest.mark.skipif(not MPS, reason="needs an Apple GPU (MPS)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3),
                                       (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("causal,dropout_p", [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_mps_matches_reference(dtype, tol, causal, dropout_p):
    torch.manual_seed(0)
    q = torch.randn(2, 37, 4, 64, dtype=dtype)
    k = torch.randn(2, 45, 2, 64, dtype=dtype)
    v = torch.randn(2, 45, 2, 64, dtype=dtype)
    dout = torch.randn(2, 37, 4, 64, dtype=dtype)
    mps = [t.to("mps").requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1)
    out = orchard.flash_attn_func(*mps, dropout_p=dropout_p, causal=causal)
    out.backward(dout.to("mps"))
    # The same seed on the CPU backend draws the same dropout mask (DESIGN.md).
    cpu = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1)
    ref = orchard.flash_attn_func(*cpu, dropout_p=dropout_p, causal=causal)
    ref.backward(dout)
    want = attention_ref(q, k, v, causal=causal)[0] if dropout_p == 0 else ref.double()
    rel = (out.cpu().double() - want).norm() / want.norm()
    assert rel < tol
    for g, r in zip((t.grad for t in mps), (t.grad for t in cpu)):
        assert ((g.cpu().double() - r.double()).norm() / r.double().norm()) < 3 * tol + 1e-5
