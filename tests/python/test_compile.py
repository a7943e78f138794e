"""torch.compile(fullgraph=True) through flash_attn_func: forward and backward, with and without
dropout, equal to eager execution."""

from __future__ import annotations

import functools

import orchard
import pytest
import torch
import torch._dynamo
import torch._inductor.config
from helpers import cu_seqlens, leaves, randn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss(q, k, v, dropout_p=0.0):
    out = orchard.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, softcap=3.0)
    return (out.float() ** 2).sum()


def varlen_loss(q, k, v, cu_q, cu_k):
    out = orchard.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 8, window_size=(3, 1))
    return (out * out).sum()


def _loss_and_grads(fn, inputs, *args, seed=0):
    torch.manual_seed(seed)
    leafs = leaves(*inputs)
    value = fn(*leafs, *args)
    value.backward()
    return [value.detach(), *(t.grad for t in leafs)]


def _assert_same_as_eager(fn, inputs, *args, backend, seed=0, exact=True):
    """Bitwise equal to eager execution (exact), or to rounding (generated kernels may sum in
    another order)."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = _loss_and_grads(compiled, inputs, *args, seed=seed)
    expected = _loss_and_grads(fn, inputs, *args, seed=seed)
    for g, e in zip(got, expected):
        assert g is not None
        if exact:
            assert torch.equal(g, e)
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    return got


def _inputs(sq=9, sk=12, dtype=torch.float32):
    return [randn(2, s, 2, 16, dtype=dtype) for s in (sq, sk, sk)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_forward_backward(backend, dropout_p):
    got = _assert_same_as_eager(loss, _inputs(), dropout_p, backend=backend)
    if dropout_p:  # another seed, another mask: the compiled graph does not bake one in
        other = _loss_and_grads(torch.compile(loss, fullgraph=True, backend=backend), _inputs(),
                                dropout_p, seed=1)
        assert not torch.equal(got[0], other[0])


def test_compiled_varlen():
    inputs = [randn(13, 2, 16) for _ in range(3)]
    _assert_same_as_eager(varlen_loss, inputs, cu_seqlens((5, 8)), cu_seqlens((8, 5)),
                          backend="aot_eager")


def test_compiled_dynamic_shapes():
    compiled = torch.compile(functools.partial(loss, dropout_p=0.0), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    for sq, sk in ((9, 12), (17, 5), (4, 30)):
        inputs = _inputs(sq, sk)
        got = _loss_and_grads(compiled, inputs)
        expected = _loss_and_grads(loss, inputs)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_compiled_function_returning_out():
    """Compile a function returning the attention output; backward runs outside the graph."""
    fn = functools.partial(orchard.flash_attn_func, causal=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = _inputs()
    mine, ref = leaves(*inputs), leaves(*inputs)
    out, out_ref = compiled(*mine), fn(*ref)
    dout = randn(*out.shape)
    out.backward(dout)
    out_ref.backward(dout)
    assert torch.equal(out, out_ref)
    for a, b in zip(mine, ref):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.inductor
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_inductor(dropout_p):
    """The default backend. Inductor draws random numbers its own way unless fallback_random,
    so with dropout that is turned on to compare with eager execution."""
    with torch._inductor.config.patch(fallback_random=True):
        _assert_same_as_eager(loss, _inputs(), dropout_p, backend="inductor", exact=False)
