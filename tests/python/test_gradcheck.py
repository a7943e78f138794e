"""Finite-difference gradient checks in float64 through the public functions (gradcheck's
default tolerances absorb the ~1e-7 relative error that float32 lse brings)."""

from __future__ import annotations

import functools

import orchard
import pytest
import torch
from helpers import cu_seqlens, leaves, randn
from torch.autograd import gradcheck

F64 = torch.float64

PADDED = {
    "plain": {},
    "causal_sq_gt_sk": {"causal": True},  # fully masked rows
    "window_softcap": {"window_size": (2, 1), "softcap": 1.5},
    "alibi_scale": {"alibi_slopes": torch.tensor([0.3, 0.1]), "softmax_scale": 0.4},
    "alibi_batch": {"alibi_slopes": torch.tensor([[0.3, 0.1], [0.2, 0.05]]), "causal": True},
}


def _seeded(fn, seed=0):
    """fn with torch's generator reset before each call, so dropout draws the same mask."""
    @functools.wraps(fn)
    def wrapper(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return wrapper


@pytest.mark.parametrize("sq", [5, 9])
@pytest.mark.parametrize("name", PADDED)
def test_gradcheck_flash_attn_func(name, sq):
    q, k, v = leaves(randn(2, sq, 2, 4, dtype=F64), randn(2, 7, 1, 4, dtype=F64),
                     randn(2, 7, 1, 3, dtype=F64))
    fn = functools.partial(orchard.flash_attn_func, **PADDED[name])
    assert gradcheck(fn, (q, k, v))


def test_gradcheck_varlen():
    lens_q, lens_k = (3, 0, 4, 2), (2, 5, 1, 0)  # empty sequences on both sides
    q, k, v = leaves(randn(9, 2, 4, dtype=F64), randn(8, 2, 4, dtype=F64),
                     randn(8, 2, 4, dtype=F64))
    fn = functools.partial(orchard.flash_attn_varlen_func, cu_seqlens_q=cu_seqlens(lens_q),
                           cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=4, max_seqlen_k=5,
                           causal=True, softcap=2.0, alibi_slopes=torch.tensor([0.2, 0.4]))
    assert gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("varlen", [False, True])
def test_gradcheck_dropout_fixed_seed(varlen):
    if varlen:
        q, k, v = leaves(randn(7, 2, 4, dtype=F64), randn(9, 1, 4, dtype=F64),
                         randn(9, 1, 4, dtype=F64))
        fn = functools.partial(orchard.flash_attn_varlen_func, cu_seqlens_q=cu_seqlens((3, 4)),
                               cu_seqlens_k=cu_seqlens((6, 3)), max_seqlen_q=4, max_seqlen_k=6)
    else:
        q, k, v = leaves(randn(1, 6, 2, 4, dtype=F64), randn(1, 8, 1, 4, dtype=F64),
                         randn(1, 8, 1, 4, dtype=F64))
        fn = orchard.flash_attn_func
    dropped = _seeded(functools.partial(fn, dropout_p=0.4, causal=True))
    assert not torch.allclose(dropped(q, k, v), fn(q, k, v, causal=True))  # the mask acts
    assert torch.equal(dropped(q, k, v), dropped(q, k, v))
    assert gradcheck(dropped, (q, k, v))


def test_gradcheck_only_some_inputs_require_grad():
    q = randn(1, 5, 2, 4, dtype=F64).requires_grad_()
    k, v = randn(1, 6, 2, 4, dtype=F64), randn(1, 6, 2, 4, dtype=F64)
    assert gradcheck(lambda q: orchard.flash_attn_func(q, k, v, causal=True), (q,))
