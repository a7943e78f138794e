"""Orchard: fused attention (FlashAttention) forward and backward for training."""

from orchard import distributed
from orchard import metal as _metal  # noqa: F401  (the MPS implementations of the ops)
from orchard._ops import FallbackError, reset_stats, set_strict, stats
from orchard.attention import flash_attn_func, flash_attn_varlen_func
from orchard.sdpa import scaled_dot_product_attention, sdpa_routing

__version__ = "0.1.0"
__all__ = [
    "FallbackError",
    "distributed",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "reset_stats",
    "scaled_dot_product_attention",
    "sdpa_routing",
    "set_strict",
    "stats",
]
