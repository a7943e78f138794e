"""Shared test helpers: DESIGN.md's error measure and thresholds, random inputs, and running
Orchard and the float64 reference through forward + backward."""

from __future__ import annotations

import dataclasses
import itertools
import math

import orchard
import torch
from orchard import _ops
from reference import attention_ref

# DESIGN.md: ||x - ref|| / ||ref|| thresholds for outputs; gradients may be 3x that.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
GRAD_TOL = {dtype: 3.0 * tol for dtype, tol in OUT_TOL.items()}
# float64 (CPU only, beyond DESIGN.md): lse is float32 by design and the backward recomputes P
# from it, so float64 gradients are accurate to about float32's epsilon.
GRAD_TOL[torch.float64] = 1e-6

FWD = _ops.ops.fwd
BWD = _ops.ops.bwd


def bwd_options(fwd_options, needs=(True, True, True)):
    """The bwd op's trailing arguments from the fwd op's: (..., deterministic, need_dq,
    need_dk, need_dv, op)."""
    return (*fwd_options[:-1], *needs, fwd_options[-1])


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; the absolute error when ref is all zeros."""
    x, ref = x.detach().double(), ref.detach().double()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert torch.isfinite(x).all(), "non-finite values"
    num = (x - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def randn(*shape, dtype=torch.float32, generator=None) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)


def cu_seqlens(lengths) -> torch.Tensor:
    """int32 (B + 1,) offsets of sequences with the given lengths."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def leaves(*tensors, dtype=None):
    """Detached copies (optionally cast) that require grad."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def grads_of(out: torch.Tensor, dout: torch.Tensor, inputs) -> list:
    """Gradients of <out, dout> w.r.t. inputs (None for inputs that got none)."""
    return list(torch.autograd.grad(out, inputs, dout.to(out.dtype), allow_unused=True))


def fwd_op(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
           alibi_slopes=None, seed=0, offset=0, deterministic=False, op="tests.fwd",
           q_position_offset=0, k_position_offset=0):
    """torch.ops.orchard.fwd with a known Philox (seed, offset): returns (out, lse)."""
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    return _ops.call(FWD, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     dropout_p, softmax_scale, causal, window_size[0], window_size[1], softcap,
                     alibi_slopes, rng, deterministic, op, q_position_offset, k_position_offset)


def orchard_attention(q, k, v, *, seed=0, offset=0, **options):
    """(out, lse) from the public API, or from fwd_op with the given Philox (seed, offset) when
    there is dropout (the public API draws its seed from torch's generator)."""
    if options.get("dropout_p", 0.0) > 0:
        return fwd_op(q, k, v, seed=seed, offset=offset, **options)
    if options.get("cu_seqlens_q") is not None:
        out, lse, _ = orchard.flash_attn_varlen_func(q, k, v, return_attn_probs=True, **options)
    else:
        out, lse, _ = orchard.flash_attn_func(q, k, v, return_attn_probs=True, **options)
    return out, lse


def check_against_reference(q, k, v, dout, **options):
    """Runs Orchard (with autograd) and the float64 reference on the same inputs and options;
    asserts out, lse and dq, dk, dv are within DESIGN.md's thresholds."""
    inputs = leaves(q, k, v)
    out, lse = orchard_attention(*inputs, **options)
    ref_options = {key: val for key, val in options.items() if not key.startswith("max_seqlen")}
    ref_inputs = leaves(q, k, v, dtype=torch.float64)
    out_ref, lse_ref = attention_ref(*ref_inputs, **ref_options)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close("out", out, out_ref, OUT_TOL[q.dtype])
    check_lse(lse, lse_ref)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads_of(out, dout, inputs),
                              grads_of(out_ref, dout, ref_inputs)):
        assert g.dtype == q.dtype
        assert_close(name, g, g_ref, GRAD_TOL[q.dtype])


def check_lse(lse: torch.Tensor, lse_ref: torch.Tensor) -> None:
    """Same +inf entries (fully masked rows), finite entries within float32 accuracy."""
    assert lse.shape == lse_ref.shape
    masked = torch.isinf(lse_ref)
    assert torch.equal(lse == math.inf, masked), "+inf lse rows differ"
    torch.testing.assert_close(lse[~masked].double(), lse_ref[~masked], rtol=1e-5, atol=1e-5)


def total_calls(direction: str) -> int:
    """Calls counted by orchard.stats() in one direction, over every backend and fallbacks."""
    s = orchard.stats()
    return sum(s[direction].values()) + s["fallbacks"][direction]


@dataclasses.dataclass
class Config:
    """One attention problem: shapes (padded, or varlen when lens_q is given) and options."""

    b: int = 1
    sq: int = 16
    sk: int = 16
    hq: int = 2
    hkv: int = 2
    d: int = 16
    dv: int | None = None
    lens_q: tuple[int, ...] | None = None
    lens_k: tuple[int, ...] | None = None
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "head" (Hq,) or "batch" (B, Hq)
    dropout_p: float = 0.0
    scale: float | None = None
    seed: int = 0
    offset: int = 0

    @property
    def varlen(self) -> bool:
        return self.lens_q is not None

    @property
    def batch(self) -> int:
        return len(self.lens_q) if self.varlen else self.b

    def inputs(self, dtype, generator=None):
        """Random q, k, v, dout of this problem's shapes."""
        dv = self.dv or self.d
        if self.varlen:
            lead_q, lead_k = (sum(self.lens_q),), (sum(self.lens_k),)
        else:
            lead_q, lead_k = (self.b, self.sq), (self.b, self.sk)
        shapes = ((*lead_q, self.hq, self.d), (*lead_k, self.hkv, self.d),
                  (*lead_k, self.hkv, dv), (*lead_q, self.hq, dv))
        return [randn(*s, dtype=dtype, generator=generator) for s in shapes]

    def options(self, generator=None) -> dict:
        """Keyword arguments for orchard_attention / attention_ref."""
        o = {"causal": self.causal, "window_size": self.window, "softcap": self.softcap,
             "dropout_p": self.dropout_p, "softmax_scale": self.scale}
        if self.dropout_p > 0:
            o.update(seed=self.seed, offset=self.offset)
        if self.alibi is not None:
            shape = (self.hq,) if self.alibi == "head" else (self.batch, self.hq)
            o["alibi_slopes"] = 0.01 + 0.3 * torch.rand(shape, generator=generator)
        if self.varlen:
            o.update(cu_seqlens_q=cu_seqlens(self.lens_q), cu_seqlens_k=cu_seqlens(self.lens_k),
                     max_seqlen_q=max(self.lens_q), max_seqlen_k=max(self.lens_k))
        return o


def check_config(cfg: Config, dtype, seed: int = 0) -> None:
    """check_against_reference on random inputs of cfg drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, dout = cfg.inputs(dtype, generator)
    check_against_reference(q, k, v, dout, **cfg.options(generator))
