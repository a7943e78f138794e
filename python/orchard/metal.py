"""Orchard's Metal kernels on PyTorch MPS tensors, through PyTorch's public torch.mps.compile_shader.

The MPS implementations of the orchard::fwd / orchard::bwd ops, so flash_attn_func,
scaled_dot_product_attention and autograd take the same path as on the other devices.
Validation and the kernels' constant buffer come from the C++ core (ops.metal_plan_fwd /
metal_plan_bwd, the checks of orchard::forward / backward on Backend::metal). Tensors are bound
zero-copy: compile_shader binds each tensor's own MTLBuffer at its storage offset
(`setBuffer:offset:storage_offset * element_size`), and the kernels take every stride from the
constant buffer; outputs are allocated here and written by the kernels in place.

NOT YET RUN: no machine of ours has an Apple GPU. The kernels are verified by the CPU emulator
(docs/metal_backend.md); this launch path awaits the macOS CI job (.github/workflows/macos.yml).
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache
from pathlib import Path

import torch

from orchard import _ops

_DTYPES = ("float", "half", "bfloat")  # info[2] of a plan


def source_root() -> Path:
    """The MSL sources: installed next to this file (metal_src/), or the checkout's src/."""
    installed = Path(__file__).with_name("metal_src")
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2] / "src"
    if (checkout / "metal" / "attention_fwd.metal").is_file():
        return checkout
    raise ImportError(f"orchard.metal: the Metal sources are missing (looked in {installed} and "
                      f"{checkout}); reinstall with `pip install .`")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def inline_source(root: Path, names=("metal/attention_fwd.metal", "metal/attention_bwd.metal")) -> str:
    """One MSL source from the kernel files with their quoted #includes resolved against `root`
    (compile_shader has no include path), each header once (#pragma once)."""
    seen: set[str] = set()
    out: list[str] = []

    def emit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"orchard.metal: {path} (included as \"{name}\") is missing")
        for line in path.read_text().splitlines():
            m = _INCLUDE.match(line)
            if m:
                emit(m.group(1))
            elif line.strip() != "#pragma once":
                out.append(line)

    for name in names:
        emit(name)
    return "\n".join(out) + "\n"


@lru_cache(maxsize=1)
def _library():
    # compile_shader takes no compile options: whatever math mode PyTorch uses applies (the
    # kernels rely on +-inf for masking; docs/metal_backend.md lists this among the unknowns).
    return torch.mps.compile_shader(inline_source(source_root()))


@lru_cache(maxsize=None)
def _dummy(device: str) -> torch.Tensor:
    """Bound where a kernel takes a buffer it will not read (no varlen, no ALiBi, no dk...)."""
    return torch.zeros(4, dtype=torch.int32, device=device)


def _params(params: torch.Tensor) -> list[int]:
    """The constant buffer as int64 words: compile_shader uploads a list of ints with setBytes,
    so the kernel's `constant KernelParams&` sees exactly these bytes."""
    raw = bytes(params.tolist())
    raw += b"\0" * (-len(raw) % 8)
    return list(struct.unpack(f"<{len(raw) // 8}q", raw))


def _launch(name: str, args: list, grid, threads: int) -> None:
    if 0 in grid:  # e.g. the preprocess of a problem without queries: nothing to run
        return
    kernel = getattr(_library(), name)
    # dispatchThreads with whole threadgroups: threadgroup_position_in_grid is the grid index.
    kernel(*args, threads=(grid[0] * threads, grid[1], grid[2]), group_size=(threads, 1, 1))


def _grid(info: torch.Tensor, first: int):
    return tuple(int(x) for x in info[first:first + 3])


@torch.library.impl("orchard::fwd", "mps")
def _fwd_mps(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
             softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, rng,
             deterministic, op, q_position_offset=0, k_position_offset=0):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    params, info = _ops.call(_ops.ops.metal_plan_fwd, q, k, v, out, lse, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                             causal, window_left, window_right, softcap, alibi_slopes, rng,
                             deterministic, op, q_position_offset, k_position_offset)
    if int(info[0]):
        return out, lse
    dummy = _dummy(str(q.device))
    name = f"attention_fwd_{_DTYPES[int(info[2])]}_{int(info[1])}"
    _launch(name, [_params(params), q, k, v, out, lse,
                   cu_seqlens_q if cu_seqlens_q is not None else dummy,
                   cu_seqlens_k if cu_seqlens_k is not None else dummy,
                   alibi_slopes if alibi_slopes is not None else dummy],
            _grid(info, 3), int(info[9]))
    return out, lse


@torch.library.impl("orchard::bwd", "mps")
def _bwd_mps(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             dropout_p, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
             rng, deterministic, need_dq, need_dk, need_dv, op, q_position_offset=0,
             k_position_offset=0):
    dq, dk, dv = (x.new_empty(x.shape if need else (0,))
                  for x, need in ((q, need_dq), (k, need_dk), (v, need_dv)))
    params, info = _ops.call(_ops.ops.metal_plan_bwd, dout, q, k, v, out, lse, dq, dk, dv,
                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_left, window_right, softcap,
                             alibi_slopes, rng, deterministic, need_dq, need_dk, need_dv, op,
                             q_position_offset, k_position_offset)
    if int(info[0]):
        return dq, dk, dv
    dummy = _dummy(str(q.device))
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else dummy
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else dummy
    alibi = alibi_slopes if alibi_slopes is not None else dummy
    dtype, bucket, threads = _DTYPES[int(info[2])], int(info[1]), int(info[9])
    words = _params(params)
    # D = rowsum(dout * out) per (b, h, row): the workspace, from PyTorch's MPS allocator.
    delta = torch.empty(max(1, int(info[10]) // 4), dtype=torch.float32, device=q.device)
    by_q, by_k = _grid(info, 3), _grid(info, 6)
    _launch(f"attention_bwd_preprocess_{dtype}", [words, out, dout, delta, cu_q, cu_k], by_q,
            threads)
    if need_dk or need_dv:
        _launch(f"attention_bwd_dkdv_{dtype}_{bucket}",
                [words, q, k, v, dout, lse, delta, dk if need_dk else dummy,
                 dv if need_dv else dummy, cu_q, cu_k, alibi], by_k, threads)
    if need_dq:
        _launch(f"attention_bwd_dq_{dtype}_{bucket}",
                [words, q, k, v, dout, lse, delta, dq, cu_q, cu_k, alibi], by_q, threads)
    return dq, dk, dv
