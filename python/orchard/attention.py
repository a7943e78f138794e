"""FlashAttention 2's Python interface: flash_attn_func and flash_attn_varlen_func."""

from __future__ import annotations

import torch

from orchard import _ops


def _window(op: str, window_size) -> tuple[int, int]:
    try:
        left, right = window_size
        return int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: window_size must be a pair (left, right) but is "
                         f"{window_size!r}") from None


def _attention(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
               return_attn_probs):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor but is {type(t).__name__}")
    left, right = _window(op, window_size)
    dropout_p = float(dropout_p)
    scale = None if softmax_scale is None else float(softmax_scale)
    out, lse = _ops.fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                        dropout_p, scale, bool(causal), left, right, float(softcap), alibi_slopes,
                        _ops.rng_state(dropout_p), bool(deterministic), op)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """Attention over q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> (B, Sq, Hq, Dv).

    FlashAttention 2's semantics: causal is bottom-right aligned; window_size (left, right) with
    -1 unbounded; GQA/MQA when Hq is a multiple of Hkv; alibi_slopes fp32 (Hq,) or (B, Hq).
    With return_attn_probs returns (out, softmax_lse (B, Hq, Sq) fp32, None). Unlike
    FlashAttention it also takes fp32 (and fp64) on the CPU.
    """
    return _attention("orchard.flash_attn_func", q, k, v, None, None, 0, 0, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False):
    """Attention over packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k,
    Hkv, Dv), sequence b spanning [cu_seqlens[b], cu_seqlens[b + 1]) (int32 (B + 1,)).
    With return_attn_probs returns (out, softmax_lse (Hq, total_q) fp32, None)."""
    return _attention("orchard.flash_attn_varlen_func", q, k, v, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                      softcap, alibi_slopes, deterministic, return_attn_probs)
