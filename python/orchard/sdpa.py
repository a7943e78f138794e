"""torch.nn.functional.scaled_dot_product_attention's interface on Orchard, and a context
manager that routes PyTorch's SDPA calls to it."""

from __future__ import annotations

import contextlib

import torch.nn.functional as F

from orchard import _ops

_OP = "orchard.scaled_dot_product_attention"
_torch_sdpa = F.scaled_dot_product_attention


def _fallback(reason, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    _ops.note_fallback(_OP, "torch-sdpa", reason)
    kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
    return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale, **kwargs)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Exactly F.scaled_dot_product_attention's semantics ((B, H, L, E) layout, top-left
    causal), computed by Orchard. Calls Orchard cannot run (an attn_mask, other ranks, broadcast
    batch dims, an unsupported device or head dim) go to PyTorch's SDPA, counted in
    orchard.stats() and the call log; orchard.set_strict(True) makes them errors."""
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None:
        return _fallback("attn_mask", *args)
    if query.dim() != key.dim() or query.dim() != value.dim() or query.dim() not in (3, 4):
        return _fallback(f"rank {query.dim()}", *args)
    if query.dim() == 3:  # (B, L, E): one head
        q, k, v = query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2)
    else:  # (B, H, L, E) -> (B, L, H, E) views, no copies
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    hq, hkv = q.shape[2], k.shape[2]
    same_batch = q.shape[0] == k.shape[0] == v.shape[0]
    if not same_batch or (hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0)):
        return _fallback("broadcast batch or head dims", *args)
    sq, sk = q.shape[1], k.shape[1]
    window = (-1, -1)
    if is_causal:
        # Top-left alignment (j <= i) in Orchard's bottom-right terms: with Sq <= Sk keys past
        # Sq are never visible, so drop them; with Sq > Sk allow Sq - Sk keys right of the
        # bottom-right diagonal.
        if sq <= sk:
            k, v = k[:, :sq], v[:, :sq]
            window = (-1, 0)
        else:
            window = (-1, sq - sk)
    try:
        out = _ops.fwd(q, k, v, None, None, 0, 0, float(dropout_p),
                       None if scale is None else float(scale), False, window[0], window[1], 0.0,
                       None, _ops.rng_state(float(dropout_p)), False, _OP)
    except NotImplementedError as e:
        return _fallback(str(e), *args)
    out = out[0]
    return out.squeeze(2) if query.dim() == 3 else out.transpose(1, 2)


@contextlib.contextmanager
def sdpa_routing():
    """Within the block, torch.nn.functional.scaled_dot_product_attention runs on Orchard (for
    models that call it, e.g. Hugging Face's "sdpa" attention)."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
