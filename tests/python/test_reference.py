"""The float64 reference itself: Philox known answers, the dropout mask, and agreement with
PyTorch's own attention where the semantics coincide."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cu_seqlens, randn
from reference import attention_ref, dropout_keep_mask, keep_threshold, philox4x32_10

M32 = 0xFFFFFFFF


@pytest.mark.parametrize(("counter", "key", "expected"), [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    # Random123's third known-answer vector (pi digits).
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert [int(w) for w in words] == list(expected)


def test_philox_vectorised_matches_scalar():
    counters = torch.tensor([[0, 1, 2, 3], [M32, 7, 0, 1], [5, M32, 9, 123456789]])
    batched = torch.stack(philox4x32_10(counters.T, (0xDEADBEEF, 0x12345678)), dim=1)
    for row, words in zip(counters, batched):
        single = philox4x32_10(row.tolist(), (0xDEADBEEF, 0x12345678))
        assert [int(w) for w in single] == words.tolist()


def test_keep_threshold():
    assert keep_threshold(0.0) == M32
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(0.25) == 3 * 2**30


def test_dropout_mask_rate_and_dependence():
    bh = torch.arange(4)
    mask = dropout_keep_mask(1234, 0, 0.3, bh, 64, 64)
    assert mask.shape == (4, 64, 64)
    assert abs(mask.double().mean().item() - 0.7) < 0.01
    assert not torch.equal(mask, dropout_keep_mask(1235, 0, 0.3, bh, 64, 64))
    assert not torch.equal(mask, dropout_keep_mask(1234, 1, 0.3, bh, 64, 64))
    assert not torch.equal(mask[0], mask[1])
    # Key j uses word j % 4 of counter (j / 4, i, bh, offset).
    words = philox4x32_10((2, 5, 3, 0), (1234, 0))
    assert [bool(mask[3, 5, 8 + w]) for w in range(4)] == [
        int(x) < keep_threshold(0.3) for x in words]


def _f64(*shapes):
    return [randn(*s, dtype=torch.float64) for s in shapes]


def _torch_attention(q, k, v, **kwargs):
    """(B, S, H, D) in, via F.scaled_dot_product_attention's (B, H, S, D) layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         **kwargs)
    return out.transpose(1, 2)


@pytest.mark.parametrize(("sq", "sk"), [(7, 7), (5, 11), (11, 5)])
def test_reference_matches_torch_sdpa(sq, sk):
    q, k, v = _f64((2, sq, 4, 16), (2, sk, 2, 16), (2, sk, 2, 8))
    out, lse = attention_ref(q, k, v)
    torch.testing.assert_close(out, _torch_attention(q, k, v, enable_gqa=True))
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, 2)) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    # Bottom-right causal equals an explicit mask j <= i + sk - sq.
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    out_causal, _ = attention_ref(q, k, v, causal=True)
    rows = mask.any(-1)
    expected = _torch_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out_causal[:, rows], expected[:, rows])
    assert torch.all(out_causal[:, ~rows] == 0)


def test_reference_fully_masked_rows_and_grads():
    q, k, v = (t.requires_grad_() for t in _f64((1, 6, 1, 8), (1, 2, 1, 8), (1, 2, 1, 8)))
    out, lse = attention_ref(q, k, v, causal=True)  # rows 0..3 see no key
    assert torch.all(out[:, :4] == 0) and torch.all(lse[..., :4] == math.inf)
    assert torch.isfinite(lse[..., 4:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[:, :4] == 0)


def test_reference_softcap_alibi_window_by_hand():
    q, k, v = _f64((1, 3, 2, 4), (1, 5, 2, 4), (1, 5, 2, 4))
    slopes = torch.tensor([0.5, 0.25])
    out, lse = attention_ref(q, k, v, softcap=2.0, alibi_slopes=slopes, window_size=(1, 0),
                             softmax_scale=0.7)
    for h in range(2):
        for i in range(3):
            js = [j for j in range(5) if i + 2 - 1 <= j <= i + 2]
            s = torch.stack([2.0 * torch.tanh(q[0, i, h] @ k[0, j, h] * 0.7 / 2.0)
                             - slopes[h] * abs(i + 2 - j) for j in js])
            torch.testing.assert_close(lse[0, h, i], torch.logsumexp(s, 0))
            torch.testing.assert_close(out[0, i, h], torch.softmax(s, 0) @ v[0, js, h])


def test_reference_varlen_equals_per_sequence():
    lens_q, lens_k = [3, 0, 5], [4, 2, 1]
    q, k, v = _f64((8, 2, 8), (7, 1, 8), (7, 1, 8))
    slopes = torch.rand(3, 2)
    out, lse = attention_ref(q, k, v, cu_seqlens_q=cu_seqlens(lens_q),
                             cu_seqlens_k=cu_seqlens(lens_k), causal=True, alibi_slopes=slopes,
                             dropout_p=0.4, seed=99)
    cq, ck = cu_seqlens(lens_q).tolist(), cu_seqlens(lens_k).tolist()
    for b in (0, 2):
        # Sequence b alone, as batch entry b of a padded batch (same Philox b * Hq + h).
        qs, ks, vs = (t[c[b]:c[b + 1]] for t, c in ((q, cq), (k, ck), (v, ck)))
        padded = (torch.stack([x.new_zeros(x.shape)] * b + [x]) for x in (qs, ks, vs))
        o, s = attention_ref(*padded, causal=True, alibi_slopes=slopes, dropout_p=0.4, seed=99)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], o[b])
        torch.testing.assert_close(lse[:, cq[b]:cq[b + 1]], s[b])
