"""The compiled ops directly: torch.library.opcheck (schema, fake kernels, autograd
registration and AOT dispatch agree with the real kernels), and the backward's use of the out
and lse it is given."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import BWD, FWD, Config, bwd_options, leaves

from orchard import _ops

SAMPLES = {
    "plain": (Config(b=2, sq=9, sk=13, hq=4, hkv=2), torch.float32),
    "features": (Config(sq=12, sk=7, causal=True, window=(4, -1), softcap=2.0, alibi="batch",
                        scale=0.5), torch.float32),
    "dropout": (Config(sq=10, sk=10, dropout_p=0.3, seed=17, offset=2), torch.float32),
    "varlen": (Config(hq=2, hkv=1, lens_q=(3, 0, 6), lens_k=(5, 2, 4), causal=True),
               torch.float32),
    "half": (Config(sq=8, sk=16, d=32, dv=16), torch.float16),
}


def _fwd_args(cfg: Config, dtype, requires_grad=True):
    q, k, v, dout = cfg.inputs(dtype)
    if requires_grad:
        q, k, v = leaves(q, k, v)
    o = cfg.options()
    rng = torch.tensor([o.get("seed", 0), o.get("offset", 0)], dtype=torch.int64)
    args = (q, k, v, o.get("cu_seqlens_q"), o.get("cu_seqlens_k"), o.get("max_seqlen_q", 0),
            o.get("max_seqlen_k", 0), cfg.dropout_p, cfg.scale, cfg.causal, *cfg.window,
            cfg.softcap, o.get("alibi_slopes"), rng, False, "tests.opcheck")
    return args, dout


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck_fwd(name):
    args, _ = _fwd_args(*SAMPLES[name])
    torch.library.opcheck(FWD, args)


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck_bwd(name):
    args, dout = _fwd_args(*SAMPLES[name], requires_grad=False)
    q, k, v, *options = args
    out, lse = FWD(*args)
    torch.library.opcheck(BWD, (dout, q, k, v, out, lse, *bwd_options(options)))


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False)])
def test_eager_autograd_matches_the_registration(name, needs):
    """_ops.fwd's eager autograd.Function (the fast path of flash_attn_func and the SDPA
    function) gives the op's registered autograd's outputs and gradients, bit for bit, and
    gradients only for the inputs that require them."""
    args, dout = _fwd_args(*SAMPLES[name], requires_grad=False)
    results = []
    for fwd in (FWD, _ops.fwd):
        q, k, v = (t.detach().requires_grad_(need) for t, need in zip(args[:3], needs))
        out, lse = fwd(q, k, v, *args[3:])
        wanted = [t for t in (q, k, v) if t.requires_grad]
        results.append((out, lse, *torch.autograd.grad(out, wanted, dout.to(out.dtype))))
    registered, eager = results
    assert len(eager) == 2 + sum(needs)
    for a, b in zip(registered, eager, strict=True):
        assert torch.equal(a, b)


def test_opcheck_bwd_partial_gradients():
    """Gradients not asked for come back empty (0,) and the others are unchanged."""
    args, dout = _fwd_args(*SAMPLES["plain"], requires_grad=False)
    q, k, v, *options = args
    out, lse = FWD(*args)
    full = BWD(dout, q, k, v, out, lse, *bwd_options(options))
    needs = (True, False, True)
    torch.library.opcheck(BWD, (dout, q, k, v, out, lse, *bwd_options(options, needs)))
    part = BWD(dout, q, k, v, out, lse, *bwd_options(options, needs))
    assert part[1].shape == (0,)
    assert torch.equal(part[0], full[0]) and torch.equal(part[2], full[2])


def test_backward_takes_merged_out_and_lse():
    """DESIGN.md: the backward takes out and lse as inputs, so that ring attention can pass
    merged values. Split the keys in two, merge the halves' (out, lse), run each half's
    backward with the merged values: the sum of the dq and the two dk / dv halves are the
    gradients of attention over all keys."""
    q, k, v, dout = Config(b=2, sq=24, sk=40, hq=4, hkv=2, d=16).inputs(torch.float64)
    rng = torch.zeros(2, dtype=torch.int64)
    options = (None, None, 0, 0, 0.0, None, False, -1, -1, 0.0, None, rng, False, "tests.ring")

    halves = [(k[:, :16], v[:, :16]), (k[:, 16:], v[:, 16:])]
    parts = [FWD(q, kh, vh, *options) for kh, vh in halves]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    weight = [torch.exp(p[1] - lse).transpose(1, 2).unsqueeze(-1) for p in parts]
    out = weight[0] * parts[0][0] + weight[1] * parts[1][0]
    grads = [BWD(dout, q, kh, vh, out, lse, *bwd_options(options)) for kh, vh in halves]

    full_out, full_lse = FWD(q, k, v, *options)
    dq, dk, dv = BWD(dout, q, k, v, full_out, full_lse, *bwd_options(options))
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)  # lse is fp32
    close(out, full_out)
    close(lse, full_lse)
    close(grads[0][0] + grads[1][0], dq)
    close(torch.cat([grads[0][1], grads[1][1]], 1), dk)
    close(torch.cat([grads[0][2], grads[1][2]], 1), dv)


def test_backward_accepts_strided_out_lse_and_dout():
    args, dout = _fwd_args(*SAMPLES["plain"], requires_grad=False)
    q, k, v, *options = args
    out, lse = FWD(*args)
    expected = BWD(dout, q, k, v, out, lse, *bwd_options(options))

    def strided(t):  # same values, in a (B, H, ...) transposed memory layout
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    got = BWD(strided(dout), q, k, v, strided(out), strided(lse), *bwd_options(options))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
