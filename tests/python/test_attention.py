"""Forward, lse and the three gradients against the float64 reference: a fixed case list
covering every feature, then hypothesis-drawn combinations (derandomized in the ci profile)."""

from __future__ import annotations

import pytest
import torch
from helpers import Config, check_config
from hypothesis import given
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 16, 32, 64, 128]

CASES = {
    "basic": Config(),
    "len1": Config(sq=1, sk=1),
    "len129_d64": Config(sq=129, sk=129, d=64),
    "sq_lt_sk_causal": Config(sq=17, sk=129, causal=True),
    "sq_gt_sk_causal": Config(sq=129, sk=17, causal=True),  # fully masked rows
    "sq_gt_sk": Config(sq=129, sk=33),
    "d8": Config(d=8),
    "d128_mqa_causal": Config(b=2, sq=150, sk=150, hq=4, hkv=1, d=128, causal=True),
    "dv_ne_d": Config(d=32, dv=16),
    "gqa": Config(b=2, sq=33, sk=45, hq=6, hkv=2, causal=True),
    "mqa": Config(sq=40, sk=40, hq=4, hkv=1),
    "window": Config(sq=150, sk=150, window=(20, 7)),
    "window_causal": Config(sq=150, sk=200, causal=True, window=(33, -1)),
    "window_zero": Config(sq=30, sk=20, window=(0, 0)),  # fully masked rows (Sq > Sk)
    "softcap": Config(sq=65, sk=70, softcap=5.0, scale=1.0),
    "alibi_head": Config(sq=65, sk=70, causal=True, alibi="head"),
    "alibi_batch": Config(b=2, sq=30, sk=50, alibi="batch"),
    "dropout": Config(sq=70, sk=90, dropout_p=0.2, seed=7),
    "dropout_causal_gqa": Config(sq=50, sk=50, hq=4, hkv=2, causal=True, dropout_p=0.5,
                                 seed=2**40 + 3, offset=11),
    "all_features": Config(b=2, sq=45, sk=60, hq=4, hkv=2, d=40, causal=True, window=(25, -1),
                           softcap=3.0, alibi="batch", dropout_p=0.1, seed=5),
    "varlen": Config(hq=4, hkv=2, causal=True, lens_q=(5, 0, 130, 17), lens_k=(9, 3, 130, 1)),
    "varlen_dropout_window": Config(window=(10, 3), dropout_p=0.3, seed=9, lens_q=(33, 70),
                                    lens_k=(40, 65)),
    "varlen_alibi_batch": Config(hq=2, hkv=1, alibi="batch", lens_q=(12, 20), lens_k=(30, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_case_list(name, dtype):
    check_config(CASES[name], dtype)


def test_float64_inputs():
    check_config(CASES["all_features"], torch.float64)


def _window_side(draw):
    return draw(st.one_of(st.just(-1), st.integers(0, 64)))


@st.composite
def configs(draw) -> Config:
    """Random problems, small enough that an example runs in milliseconds."""
    hkv = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from(HEAD_DIMS))
    shape = {"hkv": hkv, "hq": hkv * draw(st.sampled_from([1, 2, 3])), "d": d,
             "dv": draw(st.one_of(st.none(), st.sampled_from(HEAD_DIMS)))}
    if draw(st.booleans()):
        n = draw(st.integers(1, 3))
        lengths = st.lists(st.integers(0, 100), min_size=n, max_size=n).map(tuple)
        shape.update(lens_q=draw(lengths), lens_k=draw(lengths))
    else:
        shape.update(b=draw(st.integers(1, 2)), sq=draw(st.integers(1, 200)),
                     sk=draw(st.integers(1, 200)))
    causal = draw(st.booleans())
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.15, 0.5]))
    return Config(
        **shape, causal=causal,
        window=(_window_side(draw), -1 if causal else _window_side(draw)),
        softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])),
        alibi=draw(st.sampled_from([None, None, "head", "batch"])),
        dropout_p=dropout_p,
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        seed=draw(st.integers(0, 2**63 - 1)) if dropout_p else 0,
        offset=draw(st.integers(0, 2**32 - 1)) if dropout_p else 0,
    )


@given(cfg=configs(), dtype=st.sampled_from(DTYPES), data_seed=st.integers(0, 2**31))
def test_random_configs(cfg, dtype, data_seed):
    check_config(cfg, dtype, seed=data_seed)
