"""Hugging Face transformers integration: attn_implementation="orchard" against "eager" (and
"sdpa") on tiny models built from configs (no downloads)."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import orchard
import orchard.integrations.transformers as ot

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
         "max_position_embeddings": 128,
         "initializer_range": 0.2}  # sharper attention than the default 0.02: softcap bites


def llama_config():
    return transformers.LlamaConfig(**SMALL)


def mistral_config():  # every layer a sliding window of 4 tokens (sequences here are longer)
    return transformers.MistralConfig(**SMALL, sliding_window=4)


def qwen2_config():  # layer 0 full attention, layer 1 a sliding window of 3
    return transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=3,
                                    max_window_layers=1,
                                    layer_types=["full_attention", "sliding_attention"])


def gemma2_config():  # softcap 5 (scores reach it), sliding layer 0, full layer 1, scale 1/sqrt(8)
    return transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=4,
                                     attn_logit_softcapping=5.0, query_pre_attn_scalar=8)


CONFIGS = {"llama": llama_config, "mistral": mistral_config, "qwen2": qwen2_config,
           "gemma2": gemma2_config}


@pytest.fixture(autouse=True)
def _registered():
    ot.register()
    orchard.set_strict(False)
    yield
    orchard.set_strict(False)


def build(config, dtype, *implementations):
    """One model per implementation, all with the first one's weights."""
    torch.manual_seed(0)
    models = []
    for name in implementations:
        # each model gets its own config: the implementation name lives on the config
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                              attn_implementation=name)
        model = model.to(dtype)
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
    return models


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def forward_backward(model, ids, attention_mask=None, weights=None, valid=None):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=attention_mask).logits
    w = weights if valid is None else weights * valid[..., None]
    (logits * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_grads_close(got, want, tol):
    assert got.keys() == want.keys()
    worst = max(rel(got[n], want[n]) for n in want)
    assert worst < tol, worst


# Against eager: eager takes its softmax in fp32 even for fp64 models, which bounds the fp64
# agreement to ~1e-6 (measured <= 1.2e-6 on gradients); fp64 is also checked against torch SDPA.
TOL = {torch.float32: 1e-5, torch.float64: 3e-6}


def test_register():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert ot.register() == "orchard"
    assert AttentionInterface()["orchard"] is ot.orchard_attention_forward
    assert AttentionMaskInterface()["orchard"] is ot.orchard_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_matches_eager_unpadded(arch, dtype):
    names = ("eager", "orchard") + (("sdpa",) if arch != "gemma2" else ())
    eager, fused, *sdpa = build(CONFIGS[arch](), dtype, *names)
    ids = torch.randint(0, 100, (2, 12))
    weights = torch.randn(2, 12, 100, dtype=dtype)
    want_logits, want_grads = forward_backward(eager, ids, weights=weights)
    orchard.reset_stats()
    got_logits, got_grads = forward_backward(fused, ids, weights=weights)
    s = orchard.stats()
    assert s["forward"]["cpu"] == 2 and s["backward"]["cpu"] == 2, s  # one per layer
    assert s["fallbacks"] == {"forward": 0, "backward": 0}, s
    assert rel(got_logits, want_logits) < TOL[dtype]
    assert_grads_close(got_grads, want_grads, TOL[dtype])
    if dtype == torch.float64 and arch != "gemma2":
        # torch SDPA stays in fp64: the forward agrees to rounding, the gradients to Orchard's
        # fp32 logsumexp (measured <= 3.5e-7).
        sdpa_logits, sdpa_grads = forward_backward(sdpa[0], ids, weights=weights)
        assert rel(got_logits, sdpa_logits) < 1e-12
        assert_grads_close(got_grads, sdpa_grads, 1e-6)


def test_window_and_softcap_matter():
    """The sliding-window and softcap configs above do change the result (so the tests
    comparing them test something)."""
    ids = torch.randint(0, 100, (1, 12))
    for make, change in ((mistral_config, {"sliding_window": None}),
                         (gemma2_config, {"attn_logit_softcapping": None})):
        config = make()
        (model,) = build(config, torch.float64, "orchard")
        plain = copy.deepcopy(config)
        for key, value in change.items():
            setattr(plain, key, value)
        (other,) = build(plain, torch.float64, "orchard")
        other.load_state_dict(model.state_dict())
        assert rel(model(ids).logits, other(ids).logits) > 1e-3


def padded_batch(seq=10):
    """Row 0 left-padded by 3, row 1 right-padded by 4, row 2 full."""
    ids = torch.randint(1, 100, (3, seq))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, seq - 4:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_padding_runs_varlen(arch, dtype):
    # eager in fp64 gives NaN with padding (it adds float64's min to the scores and then takes
    # the softmax in fp32, where that is -inf): fp64 compares with "sdpa" instead (no softcap).
    if dtype == torch.float64 and arch == "gemma2":
        pytest.skip("no fp64 reference with both padding and softcap in transformers")
    ref_name = "eager" if dtype == torch.float32 else "sdpa"
    ref, fused = build(CONFIGS[arch](), dtype, ref_name, "orchard")
    ids, mask = padded_batch()
    valid = mask.bool()
    weights = torch.randn(3, 10, 100, dtype=dtype)
    want_logits, want_grads = forward_backward(ref, ids, mask, weights, valid)
    orchard.reset_stats()
    got_logits, got_grads = forward_backward(fused, ids, mask, weights, valid)
    s = orchard.stats()
    assert s["forward"]["cpu"] == 2 and s["backward"]["cpu"] == 2, s
    assert s["fallbacks"]["forward"] == 0, s
    assert rel(got_logits[valid], want_logits[valid]) < TOL[dtype]
    assert_grads_close(got_grads, want_grads, TOL[dtype])


def test_padding_with_holes_falls_back_visibly():
    eager, fused = build(llama_config(), torch.float32, "eager", "orchard")
    ids = torch.randint(1, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 4:6] = 0  # not one run of ones: no varlen plan
    valid = mask.bool()
    orchard.reset_stats()
    got = fused(ids, attention_mask=mask).logits
    assert orchard.stats()["fallbacks"]["forward"] == 2
    want = eager(ids, attention_mask=mask).logits
    assert rel(got[valid], want[valid]) < 1e-5
    orchard.set_strict(True)
    with pytest.raises(orchard.FallbackError):
        fused(ids, attention_mask=mask)


def test_gemma2_fallback_keeps_softcap():
    """Padding that cannot be packed with softcap goes to the eager computation (SDPA has no
    softcap)."""
    eager, fused = build(gemma2_config(), torch.float32, "eager", "orchard")
    ids = torch.randint(1, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 2:4] = 0
    valid = mask.bool()
    orchard.reset_stats()
    got = fused(ids, attention_mask=mask).logits
    assert orchard.stats()["fallbacks"]["forward"] == 2
    assert rel(got[valid], eager(ids, attention_mask=mask).logits[valid]) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generate_left_padded_matches_eager(arch):
    eager, fused = build(CONFIGS[arch](), torch.float32, "eager", "orchard")
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    want = eager.generate(ids, **kwargs)
    orchard.reset_stats()
    got = fused.generate(ids, **kwargs)
    assert torch.equal(got, want)
    s = orchard.stats()
    assert s["forward"]["cpu"] == 2 * 6 and s["fallbacks"]["forward"] == 0, s


def test_cache_continuation_matches_eager():
    """Several new tokens after a cache (queries not aligned top-left): the mask is not plain,
    the call falls back, the result is right."""
    eager, fused = build(mistral_config(), torch.float32, "eager", "orchard")
    ids = torch.randint(1, 100, (1, 12))
    out = {}
    for name, model in (("eager", eager), ("orchard", fused)):
        first = model(ids[:, :7], use_cache=True)
        cache = first.past_key_values
        if "cache" in inspect.signature(model.forward).parameters:  # renamed in transformers 5
            out[name] = model(ids[:, 7:], cache=cache).logits
        else:
            out[name] = model(ids[:, 7:], past_key_values=cache).logits
    assert rel(out["orchard"], out["eager"]) < 1e-5


def test_static_cache_generate_matches_eager():
    eager, fused = build(llama_config(), torch.float32, "eager", "orchard")
    ids = torch.randint(1, 100, (1, 6))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0,
              "cache_implementation": "static"}
    assert torch.equal(fused.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_dropout_runs_on_orchard_in_training():
    config = llama_config()
    config.attention_dropout = 0.3
    (model,) = build(config, torch.float32, "orchard")
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    orchard.reset_stats()
    torch.manual_seed(1)
    a = model(ids).logits
    a.sum().backward()
    torch.manual_seed(1)
    b = model(ids).logits
    torch.manual_seed(2)
    c = model(ids).logits
    s = orchard.stats()
    assert s["backward"]["cpu"] == 2 and s["fallbacks"]["forward"] == 0
    assert torch.equal(a, b)  # seeded from PyTorch's generator
    assert not torch.equal(a, c)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_sdpa_routing_sends_sdpa_models_to_orchard():
    eager, sdpa = build(llama_config(), torch.float32, "eager", "sdpa")
    ids = torch.randint(0, 100, (2, 12))
    weights = torch.randn(2, 12, 100)
    want_logits, want_grads = forward_backward(eager, ids, weights=weights)
    orchard.reset_stats()
    with orchard.sdpa_routing():
        got_logits, got_grads = forward_backward(sdpa, ids, weights=weights)
    s = orchard.stats()
    assert s["forward"]["cpu"] == 2 and s["backward"]["cpu"] == 2, s
    assert s["fallbacks"]["forward"] == 0, s
    assert rel(got_logits, want_logits) < 1e-5
    assert_grads_close(got_grads, want_grads, 1e-5)
    orchard.reset_stats()
    sdpa(ids)  # outside the block: PyTorch's own SDPA again
    assert orchard.stats()["forward"]["cpu"] == 0


def test_bidirectional_encoder():
    """BERT: no padding runs fused (non-causal), padding falls back to SDPA with the mask."""
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100,
                                     initializer_range=0.2)
    torch.manual_seed(0)
    models = []
    for name in ("eager", "orchard"):
        models.append(transformers.AutoModel.from_config(copy.deepcopy(config),
                                                         attn_implementation=name).eval())
    eager, fused = models
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for attention_mask, fallbacks in ((None, 0), (mask, 2)):
        orchard.reset_stats()
        got = fused(ids, attention_mask=attention_mask).last_hidden_state
        want = eager(ids, attention_mask=attention_mask).last_hidden_state
        s = orchard.stats()
        assert s["forward"]["cpu"] == 2 - fallbacks and s["fallbacks"]["forward"] == fallbacks
        valid = mask.bool() if attention_mask is not None else torch.ones(2, 9, dtype=torch.bool)
        assert rel(got[valid], want[valid]) < 1e-5


# ---- the attention function's alignment on its own -------------------------------------------


class _Layer(torch.nn.Module):
    is_causal = True
    sliding_window = None


def _reference(q, k, v, pattern):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~pattern, -torch.inf)
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("sq,sk,window", [(5, 5, None), (3, 8, None), (8, 5, None), (1, 9, None),
                                          (6, 6, 3), (4, 9, 2), (1, 9, 4), (7, 5, 4), (7, 4, 3)])
def test_attention_function_alignment(sq, sk, window):
    """mask=None: top-left causal (as torch SDPA's is_causal) within the window; one query sees
    the last `window` keys. The (7, 4, 3) case cannot be put in Orchard's terms: fallback."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, sq, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, sk, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, sk, 8, dtype=torch.float64, requires_grad=True)
    orchard.reset_stats()
    out, weights = ot.orchard_attention_forward(_Layer(), q, k, v, None, sliding_window=window)
    assert weights is None and out.shape == (2, sq, 4, 8)
    pattern = ot._pattern(sq, sk, window)
    want = _reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pattern)
    visible_rows = pattern.any(-1)  # a query with no visible key: 0 in Orchard, NaN here
    assert (out - want)[:, visible_rows].abs().max() < 1e-12
    fell_back = orchard.stats()["fallbacks"]["forward"]
    assert fell_back == (1 if (sq, sk, window) == (7, 4, 3) else 0)
    if window is None and sq > 1:  # exactly torch SDPA's is_causal
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True)
        assert (out - sdpa.transpose(1, 2)).abs().max() < 1e-12


def test_mask_function_returns_none_for_plain_windows():
    from transformers.masking_utils import (
        causal_mask_function,
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    assert ot.orchard_mask(2, 6, 6, mask_function=sliding_window_causal_mask_function(3),
                           local_size=3) is None
    assert ot.orchard_mask(2, 6, 6, mask_function=causal_mask_function) is None
    # decode: the query is the last key
    assert ot.orchard_mask(2, 1, 9, q_offset=8, mask_function=sliding_window_causal_mask_function(
        3), local_size=3) is None
    # a chunked pattern is not a window: materialized, no plan
    chunked = ot.orchard_mask(2, 6, 6, mask_function=chunked_causal_mask_function(
        3, torch.zeros(2, dtype=torch.long)), local_size=3)
    assert chunked is not None and not hasattr(chunked, ot._PLAN)
    # padding: the boolean mask, with a packing plan
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[0, :2] = False
    mask = ot.orchard_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=padding)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 6, 6)
    plan = getattr(mask, ot._PLAN)
    assert plan["cu_q"].tolist() == [0, 4, 10] and plan["max_q"] == 6
    # padding that the window hides anyway: nothing to mask
    assert ot.orchard_mask(2, 1, 6, q_offset=5, mask_function=sliding_window_causal_mask_function(
        3), local_size=3, attention_mask=padding) is None
