"""Dropout: reproducible from torch.manual_seed, the exact Philox mask of DESIGN.md, unbiased."""

from __future__ import annotations

import orchard
import pytest
import torch
from helpers import Config, check_config, fwd_op, grads_of, leaves, randn
from reference import attention_ref, dropout_keep_mask


def _run_public(seed, q, k, v, dout, **options):
    torch.manual_seed(seed)
    inputs = leaves(q, k, v)
    out = orchard.flash_attn_func(*inputs, **options)
    return [out, *grads_of(out, dout, inputs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_seed_same_results_different_seed_differs(dtype):
    q, k, v, dout = Config(b=2, sq=40, sk=50, hq=4, hkv=2).inputs(dtype)
    options = {"dropout_p": 0.3, "causal": True}
    first = _run_public(1, q, k, v, dout, **options)
    again = _run_public(1, q, k, v, dout, **options)
    other = _run_public(2, q, k, v, dout, **options)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # Consecutive calls draw new seeds from the generator.
    torch.manual_seed(1)
    assert not torch.equal(orchard.flash_attn_func(q, k, v, **options),
                           orchard.flash_attn_func(q, k, v, **options))


@pytest.mark.parametrize(("seed", "offset"), [(0, 0), (123456789, 0), (2**62 + 5, 7),
                                              (2**63 - 1, 2**32 - 1)])
def test_output_reveals_the_exact_philox_mask(seed, offset):
    """With q = 0 the probabilities are uniform 1 / Sk and with v = identity the output row is
    the dropped probability row itself: out[b, i, h, j] = keep(b, h, i, j) / (Sk (1 - p))."""
    b, sq, sk, hq, p = 2, 9, 24, 3, 0.35
    q = torch.zeros(b, sq, hq, 8)
    k = randn(b, sk, hq, 8)
    v = torch.eye(sk).expand(b, hq, sk, sk).permute(0, 2, 1, 3)  # v[b, j, h] = e_j
    out, _ = fwd_op(q, k, v, dropout_p=p, seed=seed, offset=offset)
    for batch in range(b):
        bh = batch * hq + torch.arange(hq)
        expected = dropout_keep_mask(seed, offset, p, bh, sq, sk).float() / (sk * (1 - p))
        torch.testing.assert_close(out[batch].permute(1, 0, 2), expected)


def test_offset_and_seed_high_word_change_the_mask():
    q, k, v, _ = Config(sq=20, sk=20).inputs(torch.float32)
    base = fwd_op(q, k, v, dropout_p=0.5, seed=1)[0]
    assert not torch.equal(base, fwd_op(q, k, v, dropout_p=0.5, seed=1, offset=1)[0])
    assert not torch.equal(base, fwd_op(q, k, v, dropout_p=0.5, seed=1 + 2**32)[0])
    assert torch.equal(base, fwd_op(q, k, v, dropout_p=0.5, seed=1)[0])


@pytest.mark.parametrize("p", [1e-6, 0.5, 0.95])
def test_dropout_matches_reference_with_same_mask(p):
    check_config(Config(b=2, sq=33, sk=47, hq=4, hkv=1, causal=True, dropout_p=p, seed=42,
                        offset=3), torch.float32)


def test_dropout_is_unbiased():
    """The mean over many seeds approaches the output without dropout: every element within
    5 standard errors (the seeds are fixed, so this is deterministic)."""
    q, k, v, _ = Config(sq=8, sk=16, hq=2, hkv=2, d=8).inputs(torch.float64)
    exact = attention_ref(q, k, v)[0]
    samples = torch.stack([fwd_op(q, k, v, dropout_p=0.3, seed=s)[0] for s in range(400)])
    mean, std_err = samples.mean(0), samples.std(0) / 400**0.5
    assert (std_err > 0).all()
    assert ((mean - exact).abs() <= 5 * std_err).all()
    # A single sample is far from the mean: the check above is not vacuous.
    assert ((samples[0] - exact).abs() > 5 * std_err).any()
