"""A float64 pure-PyTorch reference of DESIGN.md's attention semantics, written from the design
document only (no code shared with the C++ core). It materialises the score matrix of each
sequence, so keep problems small. Differentiable: gradients come from torch.autograd."""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of the uint32 constant `a` and the
    uint32 values in `b` (int64 tensor), without overflowing int64: `a` is split in 16-bit
    halves so every partial product stays below 2^49."""
    low = (a & 0xFFFF) * b
    high = (a >> 16) * b
    t = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(counter, key) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) of int64 tensors holding uint32 values.

    counter: four broadcastable tensors (c0, c1, c2, c3); key: two Python ints (k0, k1).
    Returns the four output words as int64 tensors of the broadcast shape."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64)
                                               for c in counter))
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M[0], c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return [c0, c1, c2, c3]


def keep_threshold(p: float) -> int:
    """min(2^32 - 1, floor((1 - p) * 2^32))."""
    return min(_MASK32, math.floor((1.0 - p) * 2.0**32))


def dropout_keep_mask(seed: int, offset: int, p: float, bh: torch.Tensor, sq: int,
                      sk: int) -> torch.Tensor:
    """Boolean keep mask (len(bh), sq, sk) of DESIGN.md: Philox key = seed as (low, high) words,
    counter = (j / 4, i, b * Hq + h, offset), output word j % 4 kept iff < keep_threshold(p)."""
    seed &= (1 << 64) - 1
    i = torch.arange(sq, dtype=torch.int64).view(1, sq, 1)
    j = torch.arange(sk, dtype=torch.int64).view(1, 1, sk)
    words = philox4x32_10((j // 4, i, bh.view(-1, 1, 1), offset), (seed & _MASK32, seed >> 32))
    u = torch.stack(words).gather(0, (j % 4).expand(1, len(bh), sq, sk))[0]
    return u < keep_threshold(p)


def _visible(sq: int, sk: int, left: int, right: int) -> torch.Tensor:
    """(sq, sk) mask: key j visible to query i iff i + sk - sq - left <= j <= i + sk - sq + right
    (bottom-right aligned), -1 meaning unbounded."""
    diag = (torch.arange(sq).view(-1, 1) + sk - sq) - torch.arange(sk).view(1, -1)  # i+sk-sq-j
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= diag <= left
    if right >= 0:
        visible &= -diag <= right
    return visible


def _attend(q, k, v, b, *, hq_total, scale, left, right, softcap, slopes, dropout):
    """One sequence: q (Sq, Hq, D), k (Sk, Hkv, D), v (Sk, Hkv, Dv) in float64.
    Returns out (Sq, Hq, Dv) and lse (Hq, Sq)."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        distance = (torch.arange(sq).view(-1, 1) + sk - sq - torch.arange(sk).view(1, -1)).abs()
        s = s - slopes.view(-1, 1, 1) * distance.to(s.dtype)
    visible = _visible(sq, sk, left, right).expand(hq, sq, sk)
    empty = ~visible.any(-1, keepdim=True)  # fully masked rows
    s = torch.where(visible, s, -math.inf).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(visible, torch.exp(s - lse), 0.0)
    if dropout is not None:
        seed, offset, prob = dropout
        bh = b * hq_total + torch.arange(hq)
        p = p * dropout_keep_mask(seed, offset, prob, bh, sq, sk) / (1.0 - prob)
    out = torch.einsum("hij,jhd->ihd", p, v)
    return out, lse.squeeze(-1).masked_fill(empty.squeeze(-1), math.inf)


def attention_ref(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, causal=False,
                  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None,
                  dropout_p=0.0, seed=0, offset=0):
    """Reference attention in float64 with flash_attn_func's arguments.

    Padded: q (B, Sq, Hq, D) -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq). Varlen (cu_seqlens given):
    q (total_q, Hq, D) -> out (total_q, Hq, Dv), lse (Hq, total_q). Fully masked rows give
    out 0 and lse +inf. Dropout uses the Philox mask of DESIGN.md with the given seed/offset."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    left, right = window_size
    if causal:
        right = 0
    options = {
        "hq_total": q.shape[-2],
        "scale": softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5,
        "left": left,
        "right": right,
        "softcap": softcap,
        "dropout": (seed, offset, dropout_p) if dropout_p > 0 else None,
    }
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float64)

    def slopes_of(b):
        return slopes if slopes is None or slopes.dim() == 1 else slopes[b]

    if cu_seqlens_q is None:
        pairs = [_attend(q[b], k[b], v[b], b, slopes=slopes_of(b), **options)
                 for b in range(q.shape[0])]
        out = torch.stack([o for o, _ in pairs]) if pairs else q.new_empty(
            (0, *q.shape[1:-1], v.shape[-1]))
        lse = torch.stack([s for _, s in pairs]) if pairs else q.new_empty((0, q.shape[2], 0))
        return out, lse
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pairs = [_attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], b,
                     slopes=slopes_of(b), **options) for b in range(len(cq) - 1)]
    return torch.cat([o for o, _ in pairs]), torch.cat([s for _, s in pairs], dim=1)
