"""Non-contiguous, offset and expanded inputs, and gradients landing in the leaves they view."""

from __future__ import annotations

import orchard
import pytest
import torch
from helpers import GRAD_TOL, OUT_TOL, assert_close, cu_seqlens, leaves, randn
from reference import attention_ref

B, SQ, SK, H, D = 2, 19, 23, 4, 16


def _transposed(q, k, v):  # leaves (B, H, S, D)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _offset_slices(q, k, v):  # leaves with 3 extra positions and 5 extra features
    return q[:, 3:, :, 2:2 + D], k[:, 3:, :, 2:2 + D], v[:, 3:, :, 1:1 + D]


def _strided_features(q, k, v):  # every other feature: last-dim stride 2
    return q[..., ::2], k[..., ::2], v[..., ::2]


def _expanded_kv(q, k, v):  # k, v leaves with one head, expanded (stride 0) to H
    return q, k.expand(-1, -1, H, -1), v.expand(-1, -1, H, -1)


def _packed_qkv(qkv, _k, _v):  # one (B, S, 3, H, D) leaf, as models project it
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


LAYOUTS = {
    "transposed": (_transposed, [(B, H, SQ, D), (B, H, SK, D), (B, H, SK, D)]),
    "offset_slices": (_offset_slices, [(B, SQ + 3, H, D + 5), (B, SK + 3, H, D + 5),
                                       (B, SK + 3, H, D + 5)]),
    "strided_features": (_strided_features, [(B, SQ, H, 2 * D), (B, SK, H, 2 * D),
                                             (B, SK, H, 2 * D)]),
    "expanded_kv": (_expanded_kv, [(B, SQ, H, D), (B, SK, 1, D), (B, SK, 1, D)]),
    "packed_qkv": (_packed_qkv, [(B, SQ, 3, H, D), (1,), (1,)]),
}


def _check_leaf_grads(build, shapes, dtype, dout_fn=None, **options):
    """Orchard and the reference, both fed views of the same leaves: outputs and the gradients
    accumulated into the leaves (through the views) must agree."""
    base = [randn(*s, dtype=dtype) for s in shapes]
    mine, ref = leaves(*base), leaves(*base, dtype=torch.float64)
    out = orchard.flash_attn_func(*build(*mine), **options)
    out_ref, _ = attention_ref(*build(*ref), **options)
    dout = dout_fn(out) if dout_fn else randn(*out.shape, dtype=dtype)
    out.backward(dout)
    out_ref.backward(dout.double())
    assert_close("out", out, out_ref, OUT_TOL[dtype])
    for leaf, leaf_ref in zip(mine, ref):
        if leaf_ref.grad is None:  # a leaf the layout does not use
            assert leaf.grad is None
        else:
            assert_close("leaf grad", leaf.grad, leaf_ref.grad, GRAD_TOL[dtype])
    return mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_and_leaf_gradients(layout, dtype):
    build, shapes = LAYOUTS[layout]
    _check_leaf_grads(build, shapes, dtype, causal=True)


def test_sliced_away_parts_get_zero_gradient():
    mine = _check_leaf_grads(*LAYOUTS["offset_slices"], torch.float32)
    q_leaf = mine[0]
    assert torch.all(q_leaf.grad[:, :3] == 0) and torch.all(q_leaf.grad[..., :2] == 0)
    assert q_leaf.grad[:, 3:, :, 2:2 + D].abs().sum() > 0


def test_expanded_dout_and_shared_qkv():
    """out.sum() backpropagates an expanded (all strides 0) dout; q, k, v are one tensor."""
    _check_leaf_grads(lambda x, _k, _v: (x, x, x), [(B, SQ, H, D), (1,), (1,)], torch.float32,
                      dout_fn=lambda out: torch.ones(()).expand(out.shape))


def test_stride_zero_batch_and_sequence():
    """k expanded along the batch and v along the sequence (one shared key row)."""
    q = randn(B, SQ, H, D)
    k = randn(1, SK, H, D).expand(B, -1, -1, -1)
    v = randn(B, 1, H, D).expand(-1, SK, -1, -1)
    out = orchard.flash_attn_func(q, k, v)
    assert_close("out", out, attention_ref(q, k, v)[0], OUT_TOL[torch.float32])


def test_varlen_views():
    lens_q, lens_k = (7, 12), (9, 4)
    qt = randn(H, 19, D).requires_grad_()  # (H, total, D) transposed to (total, H, D)
    kb = randn(13 + 2, 1, D + 3).requires_grad_()  # offset rows and features, 1 head expanded
    v = randn(13, H, D).requires_grad_()
    q, k = qt.transpose(0, 1), kb[2:, :, 3:].expand(-1, H, -1)
    options = {"cu_seqlens_q": cu_seqlens(lens_q), "cu_seqlens_k": cu_seqlens(lens_k),
               "causal": True}
    out = orchard.flash_attn_varlen_func(q, k, v, max_seqlen_q=12, max_seqlen_k=9, **options)
    ref_leaves = leaves(qt, kb, v, dtype=torch.float64)
    out_ref, _ = attention_ref(ref_leaves[0].transpose(0, 1),
                               ref_leaves[1][2:, :, 3:].expand(-1, H, -1), ref_leaves[2],
                               **options)
    assert_close("out", out, out_ref, OUT_TOL[torch.float32])
    dout = randn(*out.shape)
    out.backward(dout)
    out_ref.backward(dout.double())
    for name, leaf, leaf_ref in zip("qkv", (qt, kb, v), ref_leaves):
        assert_close(f"d{name}", leaf.grad, leaf_ref.grad, GRAD_TOL[torch.float32])


def test_layout_does_not_change_results():
    """A transposed view gives the same numbers as a contiguous copy of it."""
    qt, kt, vt = (randn(B, H, s, D) for s in (SQ, SK, SK))
    views = _transposed(qt, kt, vt)
    out_view = orchard.flash_attn_func(*views, causal=True)
    out_copy = orchard.flash_attn_func(*(t.contiguous() for t in views), causal=True)
    torch.testing.assert_close(out_view, out_copy, rtol=1e-6, atol=1e-6)
