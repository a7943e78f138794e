"""A small byte-level GPT whose causal attention runs on Orchard or on PyTorch's SDPA."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import orchard


@dataclass
class Config:
    """Model shape and the attention implementation: "orchard", "sdpa", or "ring" (this
    rank's shard of the sequence, ring attention over the default process group)."""

    seq_len: int = 128
    layers: int = 4
    dim: int = 128
    heads: int = 4
    kv_heads: int = 2
    window: int = -1  # keys left of the diagonal each query sees; -1: all
    attention: str = "orchard"
    vocab: int = 256
    ring_layout: str = "zigzag"  # how the sequence is sharded when attention == "ring"


def causal_attention(q, k, v, window: int, impl: str, ring_layout: str) -> torch.Tensor:
    """Causal attention over q (B, S, Hq, D), k and v (B, S, Hkv, D) -> (B, S, Hq, D); with
    "ring", S is this rank's shard of the sequence."""
    if impl == "orchard":
        return orchard.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    if impl == "ring":
        return orchard.distributed.ring_flash_attn_func(q, k, v, causal=True,
                                                        window_size=(window, 0),
                                                        layout=ring_layout)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if window < 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        i = torch.arange(q.shape[2], device=q.device)
        back = i[:, None] - i[None, :]  # query - key
        mask = (back >= 0) & (back <= window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention with one fused q/k/v projection."""

    def __init__(self, c: Config):
        super().__init__()
        self.c, self.head_dim = c, c.dim // c.heads
        self.qkv = nn.Linear(c.dim, (c.heads + 2 * c.kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(c.heads * self.head_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.c.heads + 2 * self.c.kv_heads, self.head_dim)
        # Strided views into the projection, handed to the kernel without copies.
        q, k, v = qkv.split([self.c.heads, self.c.kv_heads, self.c.kv_heads], dim=2)
        out = causal_attention(q, k, v, self.c.window, self.c.attention, self.c.ring_layout)
        return self.proj(out.reshape(b, s, -1))


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm, attention, RMSNorm, GELU MLP."""

    def __init__(self, c: Config):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(c.dim), Attention(c)
        self.norm2 = nn.RMSNorm(c.dim)
        self.mlp = nn.Sequential(nn.Linear(c.dim, 4 * c.dim, bias=False), nn.GELU(),
                                 nn.Linear(4 * c.dim, c.dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Byte embeddings + learned positions, blocks, tied output head."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.tok = nn.Embedding(c.vocab, c.dim)
        self.pos = nn.Embedding(c.seq_len, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.dim)
        residual_out = ("attn.proj.weight", "mlp.2.weight")  # scaled down with depth (GPT-2)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                small = name.endswith(residual_out)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.layers) if small else 0.02)

    def set_attention(self, impl: str) -> None:
        """Switches every layer to "orchard" or "sdpa" (the config object is shared)."""
        self.c.attention = impl

    def forward(self, x: torch.Tensor, y: torch.Tensor, positions=None) -> torch.Tensor:
        """Mean cross-entropy (float32) of predicting y from x, both (B, S) byte ids at
        `positions` (S,) of the sequence (default 0..S-1; a shard's positions with "ring")."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        h = self.tok(x) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        logits = self.norm(h) @ self.tok.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
