"""orchard.scaled_dot_product_attention against torch's, visible fallbacks, strict mode, and
the sdpa_routing() context manager."""

from __future__ import annotations

import orchard
import pytest
import torch
import torch.nn.functional as F
from helpers import grads_of, leaves, randn, total_calls

TORCH_SDPA = F.scaled_dot_product_attention
TOL = {torch.float64: 1e-7, torch.float32: 1e-5}

CASES = {
    "plain": ((2, 3, 17, 16), (2, 3, 17, 16), {}),
    "causal": ((2, 3, 17, 16), (2, 3, 17, 16), {"is_causal": True}),
    "causal_sq_lt_sk": ((1, 2, 9, 16), (1, 2, 30, 16), {"is_causal": True}),
    "causal_sq_gt_sk": ((1, 2, 30, 16), (1, 2, 9, 16), {"is_causal": True}),
    "sq_gt_sk": ((1, 2, 30, 8), (1, 2, 9, 8), {}),
    "gqa_causal": ((2, 6, 11, 16), (2, 2, 14, 16), {"enable_gqa": True, "is_causal": True}),
    "scale": ((1, 2, 12, 32), (1, 2, 12, 32), {"scale": 0.3}),
    "rank3": ((3, 10, 8), (3, 13, 8), {"is_causal": True}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_sdpa(name, dtype):
    q_shape, kv_shape, kwargs = CASES[name]
    base = [randn(*s, dtype=dtype) for s in (q_shape, kv_shape, kv_shape)]
    mine, theirs = leaves(*base), leaves(*base)
    before = orchard.stats()
    out = orchard.scaled_dot_product_attention(*mine, **kwargs)
    expected = TORCH_SDPA(*theirs, **kwargs)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])
    dout = randn(*out.shape, dtype=dtype)
    for g, g_ref in zip(grads_of(out, dout, mine), grads_of(expected, dout, theirs)):
        torch.testing.assert_close(g, g_ref, rtol=10 * TOL[dtype], atol=10 * TOL[dtype])
    after = orchard.stats()
    assert after["forward"]["cpu"] == before["forward"]["cpu"] + 1
    assert after["backward"]["cpu"] == before["backward"]["cpu"] + 1
    assert after["fallbacks"] == before["fallbacks"]


def _masked_call():
    q, k, v = (randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    return (q, k, v), mask


def test_attn_mask_falls_back_visibly():
    (q, k, v), mask = _masked_call()
    before = total_calls("forward"), orchard.stats()["fallbacks"]["forward"]
    out = orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask))
    assert orchard.stats()["fallbacks"]["forward"] == before[1] + 1
    assert total_calls("forward") == before[0] + 1


def test_fallback_is_logged(call_log):
    (q, k, v), mask = _masked_call()
    orchard.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    line = call_log.read_text().splitlines()[-1]
    assert line.startswith(f"FWD call={total_calls('forward')} backend=torch-sdpa "
                           "op=orchard.scaled_dot_product_attention")
    assert "fallback=attn_mask" in line


@pytest.mark.parametrize("kind", ["attn_mask", "broadcast_batch"])
def test_strict_mode_raises(kind):
    (q, k, v), mask = _masked_call()
    kwargs = {"attn_mask": mask} if kind == "attn_mask" else {}
    if kind == "broadcast_batch":
        k, v = k[:1].expand(1, 2, 5, 8), randn(3, 2, 5, 8)
    fallbacks = orchard.stats()["fallbacks"]["forward"]
    orchard.set_strict(True)
    try:
        with pytest.raises(orchard.FallbackError, match="strict mode"):
            orchard.scaled_dot_product_attention(q, k, v, **kwargs)
    finally:
        orchard.set_strict(False)
    assert orchard.stats()["fallbacks"]["forward"] == fallbacks
    if kind == "attn_mask":  # strict mode off again: falls back without raising
        orchard.scaled_dot_product_attention(q, k, v, **kwargs)
        assert orchard.stats()["fallbacks"]["forward"] == fallbacks + 1


def test_sdpa_routing():
    q, k, v = (randn(1, 2, 9, 16) for _ in range(3))
    original = F.scaled_dot_product_attention
    before = orchard.stats()["forward"]["cpu"]
    with orchard.sdpa_routing():
        assert F.scaled_dot_product_attention is orchard.scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is original
    assert orchard.stats()["forward"]["cpu"] == before + 1
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True))
    F.scaled_dot_product_attention(q, k, v)  # no longer routed
    assert orchard.stats()["forward"]["cpu"] == before + 1


def test_sdpa_routing_restores_on_error():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError), orchard.sdpa_routing():
        raise KeyError("boom")
    assert F.scaled_dot_product_attention is original


def test_unsupported_head_dim_falls_back():
    q, k, v = (randn(1, 1, 4, 520) for _ in range(3))
    fallbacks = orchard.stats()["fallbacks"]["forward"]
    out = orchard.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v))
    assert orchard.stats()["fallbacks"]["forward"] == fallbacks + 1
    orchard.set_strict(True)
    with pytest.raises(orchard.FallbackError, match="head dims"):
        orchard.scaled_dot_product_attention(q, k, v)


def test_dropout_uses_orchards_mask():
    """SDPA's dropout is Orchard's: the same seed gives flash_attn_func's result on the
    transposed inputs."""
    q, k, v = (randn(2, 3, s, 16) for s in (11, 14, 14))
    torch.manual_seed(5)
    out = orchard.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(5)
    expected = orchard.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=0.4)
    assert torch.equal(out, expected.transpose(1, 2))
    assert not torch.allclose(out, orchard.scaled_dot_product_attention(q, k, v))
