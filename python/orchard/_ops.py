"""Loads the compiled ops and registers their fake (meta) and autograd implementations."""

from __future__ import annotations

import os
from pathlib import Path

import torch

_LIB = Path(__file__).with_name("_orchard_ops.so")
if not _LIB.exists():
    raise ImportError(f"orchard: the compiled ops {_LIB} are missing; reinstall with `pip install .`")
torch.ops.load_library(str(_LIB))
ops = torch.ops.orchard

_TAGS = {
    "[orchard:invalid_argument] ": ValueError,
    "[orchard:unsupported] ": NotImplementedError,
    "[orchard:internal] ": RuntimeError,
}


def translate_error(error: RuntimeError) -> Exception:
    """Maps a tagged RuntimeError from the C++ core to ValueError / NotImplementedError."""
    message = str(error)
    for tag, kind in _TAGS.items():
        at = message.find(tag)
        if at >= 0:
            return kind(message[at + len(tag):].split("\n")[0])
    return error


def call(op, *args):
    """Runs a compiled op, raising Orchard's errors as the matching Python exceptions."""
    try:
        return op(*args)
    except RuntimeError as e:
        raise translate_error(e) from None


def rng_state(dropout_p: float) -> torch.Tensor:
    """Philox (seed, offset) for one call, drawn from PyTorch's default CPU generator so that
    torch.manual_seed makes runs reproducible. Without dropout it is unused (zeros)."""
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        return torch.cat([seed, torch.zeros(1, dtype=torch.int64)])
    return torch.zeros(2, dtype=torch.int64)


# ---- fwd -----------------------------------------------------------------------------------


def _check_devices(op: str, q, **tensors) -> None:
    """The fake kernels also run for real inputs mixed with meta tensors (the dispatcher picks
    Meta); refuse that as the compiled kernel refuses mixed devices, rather than returning
    uninitialized memory."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")


@torch.library.register_fake("orchard::fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
              softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, rng,
              deterministic, op, q_position_offset=0, k_position_offset=0):
    _check_devices(op, q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   alibi_slopes=alibi_slopes)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


_OPTION_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                 "softmax_scale", "causal", "window_left", "window_right", "softcap",
                 "alibi_slopes", "rng", "deterministic", "op", "q_position_offset",
                 "k_position_offset")


def _fwd_setup(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    opts = dict(zip(_OPTION_NAMES, options))
    ctx.save_for_backward(q, k, v, out, lse, opts.pop("cu_seqlens_q"), opts.pop("cu_seqlens_k"),
                          opts.pop("alibi_slopes"), opts.pop("rng"))
    ctx.options = opts
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, rng = ctx.saved_tensors
    o = ctx.options
    needs = ctx.needs_input_grad[:3]
    n_options = len(_OPTION_NAMES)
    if not any(needs):
        return (None,) * (3 + n_options)
    # Only the gradients autograd asks for are computed.
    grads = call(ops.bwd, dout, q, k, v, out, lse, cu_q, cu_k, o["max_seqlen_q"],
                 o["max_seqlen_k"], o["dropout_p"], o["softmax_scale"], o["causal"],
                 o["window_left"], o["window_right"], o["softcap"], alibi, rng,
                 o["deterministic"], *needs, o["op"], o["q_position_offset"],
                 o["k_position_offset"])
    return (*(g if need else None for g, need in zip(grads, needs)),) + (None,) * n_options


torch.library.register_autograd("orchard::fwd", _fwd_backward, setup_context=_fwd_setup)


class _Fwd(torch.autograd.Function):
    """Eager autograd of orchard::fwd, the same setup and backward as its registration above.
    Through the registration every call that records a graph spends ~90 us of host time in
    torch's `fill_defaults` (it rebuilds the 19-argument schema's argument list on each access;
    torch 2.11 and 2.15), more than a small model's attention kernels take: the CUDA demo ran
    at 0.84x SDPA's tokens/s. Here the op runs with grad mode off (inside forward), where
    the registration passes straight through."""

    @staticmethod
    def forward(ctx, *inputs):
        output = ops.fwd(*inputs)
        _fwd_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _fwd_backward(ctx, dout, dlse)


def fwd(*inputs):
    """orchard::fwd(q, k, v, options...) -> (out, lse) with autograd; errors as call() raises
    them. Traced code (torch.compile) and calls that record no graph use the op itself."""
    inputs = inputs + (0,) * (3 + len(_OPTION_NAMES) - len(inputs))  # position offsets: 0
    q, k, v = inputs[:3]
    records = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not records or torch.compiler.is_compiling():
        return call(ops.fwd, *inputs)
    return call(_Fwd.apply, *inputs)


@torch.library.register_fake("orchard::bwd")
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              dropout_p, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
              rng, deterministic, need_dq, need_dk, need_dv, op, q_position_offset=0,
              k_position_offset=0):
    _check_devices(op, q, dout=dout, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    # A gradient not asked for comes back as an empty (0,) tensor.
    return tuple(x.new_empty(x.shape if need else (0,))
                 for x, need in ((q, need_dq), (k, need_dk), (v, need_dv)))


# ---- counters and fallbacks -----------------------------------------------------------------

_BACKENDS = ("automatic", "cpu", "cuda", "metal", "reference")
_strict = os.environ.get("ORCHARD_STRICT", "0") not in ("", "0")


class FallbackError(RuntimeError):
    """Raised in strict mode when a call would go to another implementation."""


def set_strict(strict: bool) -> None:
    """In strict mode a call Orchard cannot run raises FallbackError instead of falling back."""
    global _strict
    _strict = bool(strict)


def note_fallback(op: str, used: str, reason: str, backward: bool = False) -> None:
    """Counts and logs a call sent to another implementation; raises in strict mode."""
    if _strict:
        raise FallbackError(f"{op}: would fall back to {used} ({reason}) but strict mode is on")
    ops.note_fallback(op, backward, used, reason)


def stats() -> dict:
    """Call counts per direction and backend, and fallbacks, since start or reset_stats()."""
    c = ops.stats().tolist()
    per = {d: {b: c[i * 5 + j] for j, b in enumerate(_BACKENDS) if b != "automatic"}
           for i, d in enumerate(("forward", "backward"))}
    per["fallbacks"] = {"forward": c[10], "backward": c[11]}
    per["staging_copies"] = {"forward": c[12], "backward": c[13]}
    return per


def reset_stats() -> None:
    ops.reset_stats()
