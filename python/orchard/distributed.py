"""Ring (context-parallel) attention over torch.distributed: the sequence is sharded across the
ranks of a process group, K/V blocks travel around the ring while each rank attends to the block
in hand, and partial results are merged with their log-sum-exp. See docs/distributed.md.

Shapes: every rank passes its shard q (B, S_local, Hq, D), k (B, S_local, Hkv, D),
v (B, S_local, Hkv, Dv) with the same S_local; the result is its shard (B, S_local, Hq, Dv).
Layouts of the full sequence (S = W * S_local) over the W ranks:
  "contiguous": rank r holds tokens [r * S_local, (r + 1) * S_local)
  "zigzag":     the sequence is cut into 2W chunks of S_local / 2 tokens; rank r holds chunks r
                and 2W - 1 - r (in that order), which balances causal work across ranks.
Every attention call carries the global positions of its query / key chunk (Orchard's
q_position_offset / k_position_offset), so masks and the dropout mask are those of one device.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import torch
import torch.distributed as dist

from orchard import _ops

__all__ = ["ring_flash_attn_func", "shard", "unshard"]

_OP = "orchard.distributed.ring_flash_attn_func"
_LAYOUTS = ("contiguous", "zigzag")


# ---- layouts -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Chunk:
    position: int  # of its first token in the full sequence
    length: int
    start: int  # of its first token in the rank's shard


def _chunks(layout: str, rank: int, world: int, s_local: int) -> tuple[_Chunk, ...]:
    """The pieces of the full sequence that `rank` holds, in shard order."""
    if layout == "contiguous":
        return (_Chunk(rank * s_local, s_local, 0),)
    c = s_local // 2
    return (_Chunk(rank * c, c, 0), _Chunk((2 * world - 1 - rank) * c, c, c))


def _check_layout(op: str, layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {_LAYOUTS} but is {layout!r}")


def _group_info(op: str, group) -> tuple[object, int, int]:
    """(group, rank in it, its size); raises when torch.distributed is not set up or this
    process is not a member."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (with a timeout)")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member "
                         "of the given group")
    return group, rank, dist.get_world_size(group)


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """This rank's shard of the full tensor x along `dim` (a contiguous copy, differentiable)."""
    op = "orchard.distributed.shard"
    _check_layout(op, layout)
    _, rank, world = _group_info(op, group)
    parts = world if layout == "contiguous" else 2 * world
    if x.shape[dim] % parts:
        raise ValueError(f"{op}: dim {dim} has size {x.shape[dim]}, which {layout} over {world} "
                         f"ranks must split into {parts} equal parts")
    s_local = x.shape[dim] // world
    return torch.cat([x.narrow(dim, c.position, c.length)
                      for c in _chunks(layout, rank, world, s_local)], dim).contiguous()


def unshard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """The full tensor from every rank's shard x along `dim` (an all_gather; not
    differentiable). Every rank gets the whole tensor."""
    op = "orchard.distributed.unshard"
    _check_layout(op, layout)
    group, _, world = _group_info(op, group)
    x = x.contiguous()
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x, group=group)
    s_local = x.shape[dim]
    if layout == "zigzag" and s_local % 2:
        raise ValueError(f"{op}: zigzag shards have an even length but dim {dim} has {s_local}")
    pieces = []
    for r, part in enumerate(gathered):
        for c in _chunks(layout, r, world, s_local):
            pieces.append((c.position, part.narrow(dim, c.start, c.length)))
    return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim)


# ---- the plan every rank agrees on ------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    group: object
    rank: int
    world: int
    layout: str
    s_local: int
    scale: float | None
    causal: bool
    left: int  # window; -1 = unbounded
    right: int  # 0 when causal
    dropout_p: float
    rng: torch.Tensor  # int64 (2,) on the CPU: Philox (seed, offset), the same on every rank

    @property
    def next_rank(self) -> int:  # global ranks of the ring neighbours
        return dist.get_global_rank(self.group, (self.rank + 1) % self.world)

    @property
    def prev_rank(self) -> int:
        return dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def pairs(self, src: int):
        """(query chunk, key chunk) pairs of this rank against the K/V of rank `src` that see at
        least one key; fully masked pairs (causal / window) are skipped, not computed."""
        for qc in _chunks(self.layout, self.rank, self.world, self.s_local):
            for kc in _chunks(self.layout, src, self.world, self.s_local):
                # Key J is visible to query I iff I - left <= J <= I + right (equal lengths, so
                # Sk - Sq = 0; causal has right = 0): test the nearest corners of the block.
                if self.right >= 0 and kc.position > qc.position + qc.length - 1 + self.right:
                    continue
                if self.left >= 0 and kc.position + kc.length - 1 < qc.position - self.left:
                    continue
                yield qc, kc

    def mask(self, qc: _Chunk, kc: _Chunk) -> tuple[bool, int, int, int, int]:
        """(causal, left, right, q_position_offset, k_position_offset) of a chunk pair's call.
        Positions matter only to dropout and to a window cutting through an off-diagonal
        pair; elsewhere an equal call without them is used (a fully visible pair: no mask; a
        diagonal pair: its local mask is the global one), so that backends without position
        offsets (CUDA for now) run the ring for causal attention."""
        if self.dropout_p == 0.0:
            q_last, k_last = qc.position + qc.length - 1, kc.position + kc.length - 1
            if ((self.right < 0 or k_last <= qc.position + self.right) and
                    (self.left < 0 or kc.position >= q_last - self.left)):
                return False, -1, -1, 0, 0
            if qc.position == kc.position:
                return self.causal, self.left, self.right, 0, 0
        return self.causal, self.left, self.right, qc.position, kc.position

    def fwd(self, q, k, v, qc: _Chunk, kc: _Chunk):
        """(out, lse) of a query chunk of q against a key chunk of k / v."""
        causal, left, right, q_pos, k_pos = self.mask(qc, kc)
        return _ops.call(_ops.ops.fwd, _rows(q, qc), _rows(k, kc), _rows(v, kc), None, None, 0,
                         0, self.dropout_p, self.scale, causal, left, right, 0.0, None, self.rng,
                         False, _OP, q_pos, k_pos)

    def bwd(self, dout, q, k, v, out, lse, qc: _Chunk, kc: _Chunk):
        """(dq, dk, dv) of one chunk pair, given the merged out / lse of the query chunk."""
        causal, left, right, q_pos, k_pos = self.mask(qc, kc)
        return _ops.call(_ops.ops.bwd, _rows(dout, qc), _rows(q, qc), _rows(k, kc), _rows(v, kc),
                         _rows(out, qc), lse[:, :, qc.start:qc.start + qc.length], None, None, 0,
                         0, self.dropout_p, self.scale, causal, left, right, 0.0, None, self.rng,
                         False, True, True, True, _OP, q_pos, k_pos)

    def exchange(self, tensors, tag: int) -> _Transfer:
        """Starts sending `tensors` to the next rank and receiving their like from the previous
        one (tags tag, tag + 1, ... keep concurrent transfers apart on gloo)."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group, tag + i)
               for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group, tag + i)
                for i, t in enumerate(received)]
        return _Transfer(tensors, received, dist.batch_isend_irecv(ops))


@dataclasses.dataclass
class _Transfer:
    """Tensors on their way around the ring. The sent ones are held until the transfer is
    waited for, so their memory cannot be reused while in flight."""

    sent: list
    received: list
    works: list

    def wait(self) -> list:
        for w in self.works:
            w.wait()
        self.sent = None
        return self.received


def _rows(x: torch.Tensor, c: _Chunk) -> torch.Tensor:
    """The tokens of chunk c of a (B, S_local, ...) shard (a view)."""
    return x[:, c.start:c.start + c.length]


def _float_bits(x: float) -> int:
    """x's float64 bit pattern as an int64, so float options travel exactly in int64 metadata."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DEVICES = ("cpu", "cuda", "mps", "other")
# What every rank must agree on: (name in messages, how to show the int64 it travels as).
_FIELDS = (("S_local (q.shape[1])", int), ("batch size", int), ("query heads", int),
           ("key/value heads", int), ("head_dim", int), ("v head_dim", int),
           ("dtype", lambda i: str(_DTYPES[i])), ("device type", lambda i: _DEVICES[i]),
           ("layout", lambda i: _LAYOUTS[i]), ("causal", bool), ("window_size[0]", int),
           ("window_size[1]", int), ("dropout_p", _bits_float),
           ("softmax_scale", lambda b: None if _bits_float(b) == math.inf else _bits_float(b)))


def _local_problem(q, k, v, layout) -> str | None:
    """What is wrong with this rank's own arguments, or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-d tensor (B, S_local, H, D)"
    if q.dtype not in _DTYPES:
        return f"q has dtype {q.dtype} but expected one of {_DTYPES}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"k and v must have q's dtype {q.dtype} but have {k.dtype}, {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return f"k and v must be on q's device {q.device} but are on {k.device}, {v.device}"
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must agree in B "
                "and S_local, k with v in heads, k with q in head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"the query heads ({q.shape[2]}) must be a multiple of the key/value heads " \
               f"({k.shape[2]})"
    if layout == "zigzag" and q.shape[1] % 2:
        return f"zigzag shards hold two equal chunks, so S_local must be even but is {q.shape[1]}"
    return None


def _agree(q, k, v, layout, causal, left, right, dropout_p, scale, group, rank, world):
    """Checks that every rank passes the same problem (one all_gather of int64 metadata) and
    returns rank 0's Philox (seed, offset). Any mismatch or local problem raises on every rank,
    so that no rank is left waiting in the ring."""
    problem = _local_problem(q, k, v, layout)
    if problem is None:
        rng = _ops.rng_state(dropout_p) if rank == 0 else torch.zeros(2, dtype=torch.int64)
        device_type = q.device.type if q.device.type in _DEVICES else "other"
        meta = [q.shape[1], q.shape[0], q.shape[2], k.shape[2], q.shape[3], v.shape[3],
                _DTYPES.index(q.dtype), _DEVICES.index(device_type), _LAYOUTS.index(layout),
                int(causal), left, right, _float_bits(dropout_p),
                _float_bits(math.inf if scale is None else scale), *rng.tolist(), 0]
    else:
        meta = [0] * (len(_FIELDS) + 2) + [1]
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()  # (world, fields)
    if problem is not None:
        raise ValueError(f"{_OP}: {problem} (rank {rank} of {world})")
    failed = [r for r, row in enumerate(table) if row[-1]]
    if failed:
        raise RuntimeError(f"{_OP}: rank(s) {failed} of the group rejected their arguments (see "
                           "the error raised there); no rank runs the ring")
    for i, (name, show) in enumerate(_FIELDS):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"{_OP}: {name} differs across the {world} ranks of the group "
                             f"(per rank: {[show(x) for x in values]}); every rank must pass the "
                             "same shard shape and options")
    return torch.tensor(table[0][len(_FIELDS):len(_FIELDS) + 2], dtype=torch.int64)


# ---- forward and backward -------------------------------------------------------------------


def _merge(out, lse, out_b, lse_b):
    """Merges a block's (out_b (B, s, H, Dv), lse_b (B, H, s)) into the fp32 accumulators
    (out, lse) in place: lse = log(exp(lse) + exp(lse_b)), out = weights of each side times it.
    Rows the block fully masks (lse_b = +inf by DESIGN.md) contribute nothing; rows nothing has
    seen yet hold lse = -inf."""
    lse_b = lse_b.masked_fill(lse_b == math.inf, -math.inf)
    new = torch.logaddexp(lse, lse_b)
    ref = new.masked_fill(new == -math.inf, 0.0)  # both -inf: weights exp(-inf) = 0, no NaN
    w_old = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)  # (B, s, H, 1)
    w_new = torch.exp(lse_b - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(out_b.float() * w_new)
    lse.copy_(new)


def _ring_forward(q, k, v, plan: _Plan):
    """This rank's (out (B, S_local, Hq, Dv) in q's dtype, lse (B, Hq, S_local) fp32)."""
    B, S, Hq, _ = q.shape
    out = q.new_zeros((B, S, Hq, v.shape[3]), dtype=torch.float32)
    lse = q.new_full((B, Hq, S), -math.inf, dtype=torch.float32)
    kv = [k.contiguous(), v.contiguous()]
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world  # whose K/V is in hand
        # The next block travels while this one is attended to.
        pending = plan.exchange(kv, tag=0) if step + 1 < plan.world else None
        for qc, kc in plan.pairs(src):
            out_b, lse_b = plan.fwd(q, *kv, qc, kc)
            _merge(_rows(out, qc), lse[:, :, qc.start:qc.start + qc.length], out_b, lse_b)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse.masked_fill(lse == -math.inf, math.inf)


def _ring_backward(dout, q, k, v, out, lse, plan: _Plan):
    """(dq, dk, dv) of this rank's shards. dK/dV of the block in hand are accumulated in fp32 and
    travel with it; after W steps each has come back to its owner."""
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv = [k.contiguous(), v.contiguous()]
    dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
    dkv_pending = None
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        kv_pending = plan.exchange(kv, tag=0) if step + 1 < plan.world else None
        blocks = []
        for qc, kc in plan.pairs(src):
            dq_b, dk_b, dv_b = plan.bwd(dout, q, *kv, out, lse, qc, kc)
            _rows(dq, qc).add_(dq_b)
            blocks.append((kc, dk_b, dv_b))
        # The accumulators of the block in hand arrive from the previous rank meanwhile.
        if dkv_pending is not None:
            dkv = dkv_pending.wait()
        for kc, dk_b, dv_b in blocks:
            _rows(dkv[0], kc).add_(dk_b)
            _rows(dkv[1], kc).add_(dv_b)
        if plan.world > 1:
            dkv_pending = plan.exchange(dkv, tag=2)
        if kv_pending is not None:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dkv = dkv_pending.wait()  # our own block's, back from the last rank that held it
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = _ring_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.plan)
        return dq, dk, dv, None


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), group=None, layout="contiguous"):
    """Attention over a sequence sharded across the ranks of `group` (default: the world).

    q (B, S_local, Hq, D), k (B, S_local, Hkv, D), v (B, S_local, Hkv, Dv): this rank's shard,
    the same S_local on every rank; returns this rank's shard of the output (B, S_local, Hq,
    Dv). Semantics are flash_attn_func's on the full sequence (causal / window aligned on
    global positions; Sq == Sk, so bottom-right and top-left agree); dropout draws the Philox
    mask a single device draws for the same seed (rank 0's, from torch's generator). Every rank
    must call it with the same options; mismatches raise on every rank. A rank that fails
    later leaves the others waiting until the process group's timeout.
    """
    _check_layout(_OP, layout)
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{_OP}: window_size must be a pair (left, right) but is "
                         f"{window_size!r}") from None
    if causal:
        if right > 0:
            raise ValueError(f"{_OP}: causal=True implies window_size[1] = 0 but it is {right}")
        right = 0
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1) but is {dropout_p}")
    scale = None if softmax_scale is None else float(softmax_scale)
    group, rank, world = _group_info(_OP, group)
    rng = _agree(q, k, v, layout, causal, left, right, dropout_p, scale, group, rank, world)
    plan = _Plan(group, rank, world, layout, q.shape[1], scale, causal, left, right, dropout_p,
                 rng)
    return _RingAttention.apply(q, k, v, plan)
