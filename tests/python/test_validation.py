"""Bad inputs raise ValueError / NotImplementedError / TypeError whose message names the op,
the argument, what was expected and what was received; nothing crashes."""

from __future__ import annotations

import orchard
import pytest
import torch
from helpers import BWD, FWD, randn

FA = "orchard.flash_attn_func"
VARLEN = "orchard.flash_attn_varlen_func"

Q, K, V = randn(1, 4, 2, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def fa(**overrides):
    """flash_attn_func on valid inputs, with some arguments replaced."""
    args = {"q": Q, "k": K, "v": V, **overrides}
    return lambda: orchard.flash_attn_func(**args)


def varlen(**overrides):
    """flash_attn_varlen_func on one valid sequence of 4 queries and 5 keys."""
    args = {"q": Q[0], "k": K[0], "v": V[0], "cu_seqlens_q": _i32(0, 4),
            "cu_seqlens_k": _i32(0, 5), "max_seqlen_q": 4, "max_seqlen_k": 5, **overrides}
    return lambda: orchard.flash_attn_varlen_func(**args)


def raw(op, *args):
    return lambda: orchard._ops.call(op, *args)


def _fwd_args(rng=None, offset=0, dropout_p=0.0, cu_q=None):
    rng = torch.tensor([0, offset]) if rng is None else rng
    return (Q, K, V, cu_q, None, 0, 0, dropout_p, None, False, -1, -1, 0.0, None, rng, False,
            "tests.op")


def _bwd(**replace):
    out, lse = FWD(*_fwd_args())
    t = {"dout": randn(*out.shape), "q": Q, "k": K, "v": V, "out": out, "lse": lse,
         "q_position_offset": 0, "k_position_offset": 0, **replace}
    return raw(BWD, t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], None, None, 0, 0,
               0.0, None, False, -1, -1, 0.0, None, torch.zeros(2, dtype=torch.int64), False,
               True, True, True, "tests.op", t["q_position_offset"], t["k_position_offset"])


# name: (call, exception, fragments the message must contain)
BAD = {
    "head_dim_mismatch": (fa(k=randn(1, 5, 2, 4)), ValueError, [FA, "k has head_dim 4", "q has 8"]),
    "heads_not_multiple": (fa(q=randn(1, 4, 3, 8)), ValueError,
                           [FA, "query heads (3)", "multiple", "key/value heads (2)"]),
    "zero_kv_heads": (fa(k=randn(1, 5, 0, 8), v=randn(1, 5, 0, 8)), ValueError,
                      [FA, "query heads (2)", "key/value heads (0)"]),
    "int64_inputs": (fa(q=Q.long(), k=K.long(), v=V.long()), ValueError,
                     [FA, "q has dtype int64", "float32, float16, bfloat16"]),
    "int32_inputs": (fa(q=Q.int(), k=K.int(), v=V.int()), ValueError,
                     [FA, "q has dtype int32", "expected float32"]),
    "mixed_dtypes": (fa(k=K.double()), ValueError, [FA, "k has dtype float64", "q has float32"]),
    "not_a_tensor": (fa(q=Q.numpy()), TypeError, [FA, "q must be a torch.Tensor", "ndarray"]),
    "rank": (fa(q=Q[0]), ValueError, [FA, "q must have 4 dimensions", "has 3", "(4, 2, 8)"]),
    "batch_mismatch": (fa(k=randn(2, 5, 2, 8), v=randn(2, 5, 2, 8)), ValueError,
                       [FA, "k has batch size 2", "q has 1"]),
    "v_heads": (fa(v=randn(1, 5, 1, 8)), ValueError, [FA, "v has 1 heads", "k has 2"]),
    "v_length": (fa(v=randn(1, 6, 2, 8)), ValueError, [FA, "v has shape (1, 6, 2, 8)",
                                                       "k has (1, 5, 2, 8)"]),
    "dropout_one": (fa(dropout_p=1.0), ValueError, [FA, "dropout_p", "[0, 1)", "is 1"]),
    "dropout_negative": (fa(dropout_p=-0.1), ValueError, [FA, "dropout_p", "[0, 1)", "-0.1"]),
    "dropout_nan": (fa(dropout_p=float("nan")), ValueError, [FA, "dropout_p", "nan"]),
    "window_not_pair": (fa(window_size=3), ValueError, [FA, "window_size", "pair", "3"]),
    "window_triple": (fa(window_size=(1, 2, 3)), ValueError, [FA, "window_size", "(1, 2, 3)"]),
    "window_none": (fa(window_size=None), ValueError, [FA, "window_size", "None"]),
    "window_below_minus_one": (fa(window_size=(-2, 0)), ValueError,
                               [FA, "window_size must be >= -1", "(-2, 0)"]),
    "causal_with_right_window": (fa(causal=True, window_size=(-1, 2)), ValueError,
                                 [FA, "causal", "window_size[1] = 0", "is 2"]),
    "softcap_negative": (fa(softcap=-1.0), ValueError, [FA, "softcap", ">= 0", "-1"]),
    "scale_infinite": (fa(softmax_scale=float("inf")), ValueError, [FA, "softmax_scale", "inf"]),
    "alibi_shape": (fa(alibi_slopes=torch.rand(3)), ValueError,
                    [FA, "alibi_slopes has shape (3,)", "(Hq,) or (B, Hq)", "(2,)"]),
    "alibi_dtype": (fa(alibi_slopes=torch.rand(2, dtype=torch.float64)), ValueError,
                    [FA, "alibi_slopes has dtype float64", "float32"]),
    "head_dim_zero": (fa(q=randn(1, 4, 2, 0), k=randn(1, 5, 2, 0)), NotImplementedError,
                      [FA, "head dims 1 to 512", "D = 0"]),
    "head_dim_too_big": (fa(q=randn(1, 4, 2, 520), k=randn(1, 5, 2, 520)), NotImplementedError,
                         [FA, "head dims 1 to 512", "D = 520"]),
    "device_mismatch": (fa(k=K.to("meta")), ValueError, [FA, "k is on meta", "q is on cpu"]),
    "varlen_rank": (varlen(q=Q), ValueError, [VARLEN, "q must have 3 dimensions", "(total, H, D)"]),
    "cu_first_nonzero": (varlen(cu_seqlens_q=_i32(1, 4)), ValueError,
                         [VARLEN, "cu_seqlens_q[0] must be 0", "is 1"]),
    "cu_last_not_total": (varlen(cu_seqlens_q=_i32(0, 3)), ValueError,
                          [VARLEN, "cu_seqlens_q[-1]", "total number of tokens 4", "is 3"]),
    "cu_decreasing": (varlen(cu_seqlens_q=_i32(0, 3, 2, 4), cu_seqlens_k=_i32(0, 1, 2, 5)),
                      ValueError, [VARLEN, "non-decreasing", "cu_seqlens_q[2] = 2"]),
    "cu_int64": (varlen(cu_seqlens_q=torch.tensor([0, 4])), ValueError,
                 [VARLEN, "cu_seqlens_q has dtype int64", "int32"]),
    "cu_lengths_differ": (varlen(cu_seqlens_k=_i32(0, 2, 5)), ValueError,
                          [VARLEN, "cu_seqlens_k has shape (3,)", "(2,) = (B + 1,)"]),
    "cu_2d": (varlen(cu_seqlens_q=_i32(0, 4).view(1, 2)), ValueError,
              [VARLEN, "cu_seqlens_q has shape (1, 2)", "(B + 1,)"]),
    "cu_empty": (varlen(cu_seqlens_q=_i32(), cu_seqlens_k=_i32()), ValueError,
                 [VARLEN, "cu_seqlens_q has shape (0,)", "(B + 1,)"]),
    "cu_strided": (varlen(cu_seqlens_q=_i32(0, 9, 4, 9)[::2]), ValueError,
                   [VARLEN, "cu_seqlens_q must be contiguous", "stride 2"]),
    "max_seqlen_too_small": (varlen(max_seqlen_q=2), ValueError,
                             [VARLEN, "max_seqlen_q is 2", "longest", "4 tokens"]),
    "max_seqlen_negative": (varlen(max_seqlen_k=-1), ValueError,
                            [VARLEN, "max_seqlen_k must be >= 0", "-1"]),
    "only_cu_seqlens_q": (raw(FWD, *_fwd_args(cu_q=_i32(0, 4))), ValueError,
                          ["tests.op", "cu_seqlens_q and cu_seqlens_k", "only cu_seqlens_q"]),
    "dropout_offset_too_big": (raw(FWD, *_fwd_args(offset=2**33, dropout_p=0.5)), ValueError,
                               ["tests.op", "offset must be < 2^32", "8589934592"]),
    "q_position_offset_negative": (raw(FWD, *_fwd_args(), -1, 0), ValueError,
                                   ["tests.op", "q_position_offset must be in [0, 2^32 - Sq]",
                                    "but is -1"]),
    "k_position_offset_too_big": (_bwd(k_position_offset=2**32 - 4), ValueError,
                                  ["tests.op", "k_position_offset must be in [0, 2^32 - Sk] = "
                                   "[0, 4294967291]", "but is 4294967292"]),
    "position_offset_varlen": (raw(FWD, Q[0], K[0], V[0], _i32(0, 4), _i32(0, 5), 4, 5, 0.0,
                                   None, False, -1, -1, 0.0, None, torch.zeros(2).long(), False,
                                   "tests.op", 3, 0), ValueError,
                               ["tests.op", "not supported with varlen", "are (3, 0)"]),
    "bwd_dout_shape": (_bwd(dout=randn(1, 4, 2, 7)), ValueError,
                       ["tests.op", "dout has shape (1, 4, 2, 7)", "expected (1, 4, 2, 8)"]),
    "bwd_lse_dtype": (_bwd(lse=torch.zeros(1, 2, 4, dtype=torch.float64)), ValueError,
                      ["tests.op", "lse has dtype float64", "float32"]),
    "bwd_lse_shape": (_bwd(lse=torch.zeros(1, 2, 3)), ValueError,
                      ["tests.op", "lse has shape (1, 2, 3)", "(1, 2, 4) = (B, Hq, Sq)"]),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_message(name):
    call, kind, fragments = BAD[name]
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_errors_do_not_count_as_calls():
    before = orchard.stats()
    with pytest.raises(ValueError):
        fa(dropout_p=1.0)()
    assert orchard.stats() == before


def test_valid_after_errors():
    """The library still works after every error above (no corrupted state)."""
    for call, kind, _ in BAD.values():
        with pytest.raises(kind):
            call()
    out = orchard.flash_attn_func(Q, K, V)
    torch.testing.assert_close(out, orchard.flash_attn_func(Q.clone(), K.clone(), V.clone()))
    assert torch.isfinite(out).all()


def test_empty_problems_are_valid():
    """Zero batch, zero queries and zero keys are defined: empty / zero outputs, +inf lse."""
    out, lse, _ = orchard.flash_attn_func(Q, K[:, :0], V[:, :0], return_attn_probs=True)
    assert torch.all(out == 0) and torch.all(lse == float("inf"))
    assert orchard.flash_attn_func(Q[:0], K[:0], V[:0]).shape == (0, 4, 2, 8)
    assert orchard.flash_attn_func(Q[:, :0], K, V).shape == (1, 0, 2, 8)


def test_meta_tensors_give_shapes_only():
    out, lse, _ = orchard.flash_attn_func(*(t.to("meta") for t in (Q, K, V)),
                                          return_attn_probs=True)
    assert out.device.type == lse.device.type == "meta"
    assert out.shape == (1, 4, 2, 8) and lse.shape == (1, 2, 4) and lse.dtype == torch.float32


def test_loose_max_seqlen_is_accepted():
    """max_seqlen is an upper bound: a loose one (2^40) gives the same result as the exact one."""
    exact = varlen()()
    assert torch.equal(varlen(max_seqlen_q=2**40, max_seqlen_k=2**40)(), exact)
