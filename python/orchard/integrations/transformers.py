"""Orchard as a Hugging Face transformers attention implementation.

Usage, once per process, before the model is built::

    import orchard.integrations.transformers; orchard.integrations.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="orchard")

(``from_config(config, attn_implementation="orchard")`` and
``model.set_attn_implementation("orchard")`` work the same way.)

``register()`` adds two entries under the name "orchard":

- ``AttentionInterface``: :func:`orchard_attention_forward`, with the signature of transformers'
  own attention functions: ``(module, query, key, value, attention_mask, scaling=None,
  dropout=0.0, **kwargs)``, query/key/value (B, H, S, D), returning ((B, S, H, D), None).
- ``AttentionMaskInterface``: :func:`orchard_mask`. transformers builds one mask per forward
  with the mask function registered under the model's attention implementation; for a name
  without one it builds *no mask at all* (padding would be silently ignored), hence this entry.

What runs where
---------------
Orchard's fused kernels (forward and backward) run:

- causal LM without padding, with or without a KV cache (prefill, decode, training): the mask is
  None and ``is_causal`` (module attribute or kwarg) gives a causal attention aligned top-left as
  in ``torch.nn.functional.scaled_dot_product_attention`` (keys past the queries' length are
  dropped), a single query attends to every key;
- sliding-window layers (``sliding_window`` kwarg, else ``module.sliding_window``): a window of
  ``sliding_window`` tokens including the query's own, as transformers' masks define it
  (``window_size=(sliding_window - 1, 0)``);
- ``softcap`` (Gemma 2), ``scaling``, GQA/MQA (key/value keep their fewer heads, no repeat),
  dropout (``dropout`` while ``module.training``; Orchard's own Philox stream, seeded from
  PyTorch's generator, so it does not reproduce eager's dropout pattern), bidirectional layers
  (``is_causal=False``) without padding;
- **padding masks are converted to varlen**: when the 2D ``attention_mask`` has zeros and each
  row's ones are contiguous (left or right padding), either without a cache offset (training,
  prefill: query i and key i are the same token) or with a single query whose row's ones reach
  the last key (decode with left padding), the tokens are packed and run through
  ``flash_attn_varlen_func``; the outputs at padded query positions are zeros (eager gives
  values there that no valid position uses).

Everything else is a **visible fallback**, counted in ``orchard.stats()['fallbacks']`` and in the
call log, and an error under ``orchard.set_strict(True)``: a custom 4D mask, packed sequences
given by ``position_ids``, padding with holes, padding with a static cache or while adding
several tokens to a cache, bidirectional layers with padding go to PyTorch's SDPA with the
boolean mask (or, with softcap, an attention bias or attention sinks, to an eager computation);
shapes or dtypes Orchard does not cover go the same way. While ``torch.compile`` traces, the mask
function is transformers' ``sdpa_mask`` unchanged (its analysis would read tensor values): plain
causal masks still give None, sliding-window and padding masks fall back.

How the mask function decides: it evaluates the layer's mask pattern (causal, sliding window,
chunked, ... as transformers hands it over) on the query and key positions and compares it with
the pattern Orchard computes for ``mask=None`` (top-left causal within the window). Equal and
no padding among the visible keys: it returns None (transformers' SDPA mask function does the
same for plain causal masks, but materializes every sliding-window mask). Otherwise it returns
exactly the boolean mask of transformers' ``sdpa_mask``; when that mask is causal plus padding
of the kinds above, it carries the varlen packing plan as an attribute (a sliced or otherwise
derived mask is a new tensor without it, and falls back).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from orchard import _ops
from orchard.attention import flash_attn_func, flash_attn_varlen_func
from orchard.sdpa import _torch_sdpa

__all__ = ["NAME", "orchard_attention_forward", "orchard_mask", "register"]

NAME = "orchard"
_OP = "orchard.integrations.transformers"
_PLAN = "_orchard_varlen_plan"
_logger = logging.getLogger(__name__)
_warned: set[str] = set()


def register(name: str = NAME) -> str:
    """Registers Orchard's attention function and mask function with transformers under `name`
    (idempotent) and returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, orchard_attention_forward)
    AttentionMaskInterface.register(name, orchard_mask)
    return name


# ---- mask function ---------------------------------------------------------------------------


def _tracing(*tensors) -> bool:
    try:
        from transformers.utils.import_utils import is_tracing
    except ImportError:  # older or newer layout: the compiler check is the part that matters
        return torch.compiler.is_compiling()
    return any(is_tracing(t) for t in tensors if isinstance(t, torch.Tensor)) or is_tracing()


def _pattern(q_length: int, kv_length: int, window: int | None, device=None) -> torch.Tensor:
    """The (q, kv) boolean pattern that Orchard computes for mask=None on a causal layer:
    top-left causal (key j visible to query i iff j <= i) within `window` tokens (i - j <
    window); a single query sees the last `window` keys (all without a window)."""
    i = torch.arange(q_length, device=device)[:, None]
    j = torch.arange(kv_length, device=device)[None, :]
    if q_length == 1:
        return (kv_length - 1 - j) < (window if window is not None else kv_length)
    visible = j <= i
    if window is not None:
        visible = visible & ((i - j) < window)
    return visible


def _layer_pattern_is_plain(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                            local_size, device):
    """Whether the layer's mask function, before padding, is exactly _pattern(local_size).
    Returns that pattern, or None when it differs (or cannot be evaluated index-wise)."""
    expected = _pattern(q_length, kv_length, local_size, device)
    try:
        b = torch.arange(batch_size, device=device)[:, None, None, None]
        h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
        qi = (torch.arange(q_length, device=device) + q_offset)[None, None, :, None]
        ki = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
        grid = torch.as_tensor(mask_function(b, h, qi, ki), device=device)
    except Exception:  # noqa: BLE001 - not index-based: left to transformers' own mask builder
        return None
    if grid.dtype != torch.bool or grid.dim() > 4:
        return None
    return expected if bool(torch.all(grid == expected)) else None


def _contiguous_rows(padding: torch.Tensor):
    """For a (B, S) bool mask whose ones are one run per row: (first, length) per row."""
    s = padding.shape[1]
    idx = torch.arange(s, device=padding.device)
    length = padding.sum(1)
    first = torch.where(padding, idx, s).amin(1)
    last = torch.where(padding, idx, -1).amax(1)
    ok = (length == 0) | (last - first + 1 == length)
    return (first, length) if bool(ok.all()) else None


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _varlen_plan(padding, batch_size, q_length, kv_length, q_offset, kv_offset, window):
    """The packing plan for causal (+window) attention with a padding mask, or None."""
    if padding.shape[0] != batch_size:
        return None
    rows = _contiguous_rows(padding)
    if rows is None:
        return None
    _, length = rows
    window_left = -1 if window is None else int(window) - 1
    k_index = padding.reshape(-1).nonzero().squeeze(1)
    if q_length == kv_length and int(q_offset) == int(kv_offset):
        # Training / prefill: query i is key i's token; pack the same positions.
        return {"q_index": k_index, "k_index": k_index, "cu_q": _cu(length), "cu_k": _cu(length),
                "max_q": int(length.max()), "max_k": int(length.max()),
                "window": (window_left, 0), "shape": (batch_size, 1, q_length, kv_length)}
    if q_length == 1 and bool(padding[:, -1].all()):
        # Decode with left padding: the query is each row's last key.
        ones = torch.ones(batch_size, dtype=length.dtype, device=padding.device)
        return {"q_index": None, "k_index": k_index, "cu_q": _cu(ones), "cu_k": _cu(length),
                "max_q": 1, "max_k": int(length.max()),
                "window": (window_left, 0), "shape": (batch_size, 1, q_length, kv_length)}
    return None


def orchard_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function=None, attention_mask: torch.Tensor | None = None,
                 local_size: int | None = None, allow_is_causal_skip: bool = True,
                 allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
                 device="cpu", **kwargs):
    """transformers mask function for "orchard" (AttentionMaskInterface signature, as
    ``sdpa_mask``). Returns None where Orchard computes the pattern itself (see the module
    docstring), else ``sdpa_mask``'s boolean (B, 1, q, kv) mask, carrying a varlen plan when it is
    causal + contiguous padding."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    plain = None
    padding = None
    # Only masks that transformers itself would allow to replace by `is_causal` (no extra mask
    # functions, no packed sequences, not a compiled decode) and that can be read here.
    if allow_is_causal_skip and not use_vmap and not _tracing(attention_mask, q_offset):
        plain = _layer_pattern_is_plain(mask_function, batch_size, q_length, kv_length, q_offset,
                                        kv_offset, local_size, device)
    if plain is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, int(kv_offset))
        if padding is not None:
            start = int(kv_offset)
            padding = padding[:, start:start + kv_length].to(device=plain.device, dtype=torch.bool)
        if padding is None or bool(padding[:, plain.any(0)].all()):
            return None
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                     device=device, **kwargs)
    if plain is not None and isinstance(mask, torch.Tensor):
        plan = _varlen_plan(padding, batch_size, q_length, kv_length, q_offset, kv_offset,
                            local_size)
        if plan is not None:
            setattr(mask, _PLAN, plan)
    return mask


# ---- attention function ----------------------------------------------------------------------


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _logger.warning(message)


def _dense(q, k, v, causal, window, dropout_p, scaling, softcap):
    """mask=None on (B, S, H, D) views: top-left causal (see _pattern) or full attention.
    Returns None when the window cannot be put in Orchard's (bottom-right) terms."""
    sq, sk = q.shape[1], k.shape[1]
    left = -1 if window is None else int(window) - 1
    if causal and sq > 1:
        if sq <= sk:  # keys past the last query are never visible: drop them
            k, v = k[:, :sq], v[:, :sq]
            win = (left, 0)
        else:  # allow sq - sk keys right of the bottom-right diagonal
            right = sq - sk
            if window is not None and left - right < 0:
                return None
            win = (left if window is None else left - right, right)
    elif sq == 1:
        win = (left, 0)  # one query: the last `window` keys
    else:
        win = (-1, -1)  # bidirectional; a window is applied through the mask only
    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scaling, causal=False,
                           window_size=win, softcap=softcap)


def _varlen(plan, q, k, v, dropout_p, scaling, softcap):
    b, sq, hq, _ = q.shape
    qf = q.reshape(b * sq, hq, q.shape[-1])
    kf = k.reshape(b * k.shape[1], k.shape[2], k.shape[3])
    vf = v.reshape(b * v.shape[1], v.shape[2], v.shape[3])
    qi, ki = plan["q_index"], plan["k_index"]
    qp = qf if qi is None else qf.index_select(0, qi)
    out = flash_attn_varlen_func(qp, kf.index_select(0, ki), vf.index_select(0, ki), plan["cu_q"],
                                 plan["cu_k"], plan["max_q"], plan["max_k"], dropout_p=dropout_p,
                                 softmax_scale=scaling, causal=False, window_size=plan["window"],
                                 softcap=softcap)
    if qi is not None:
        out = out.new_zeros((b * sq, hq, out.shape[-1])).index_copy(0, qi, out)
    return out.reshape(b, sq, hq, out.shape[-1])


def _eager(query, key, value, mask, dropout_p, scaling, softcap, position_bias, sinks):
    """Reference computation as transformers' eager attention (query (B, H, S, D))."""
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if sinks is not None:
        column = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
    low = scores.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _fallback(reason, query, key, value, mask, causal, window, dropout_p, scaling, softcap,
              position_bias, sinks):
    sq, sk = query.shape[2], key.shape[2]
    if mask is None and (sq == 1 and window is not None or causal and sq > 1):
        mask = _pattern(sq, sk, window, query.device)  # what mask=None means (see _dense)
    if softcap or position_bias is not None or sinks is not None:
        _ops.note_fallback(_OP, "eager", reason)
        return _eager(query, key, value, mask, dropout_p, scaling, softcap, position_bias, sinks)
    _ops.note_fallback(_OP, "torch-sdpa", reason)
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    out = _torch_sdpa(query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scaling, **gqa)
    return out.transpose(1, 2).contiguous()


def orchard_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function (AttentionInterface signature): query (B, Hq, Sq, D), key
    and value (B, Hkv, Sk, D[v]) -> ((B, Sq, Hq, Dv), None). See the module docstring."""
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions", "orchard attention does not return attention weights "
                   "(output_attentions=True); use attn_implementation='eager' for them")
    softcap = float(kwargs.get("softcap") or 0.0)
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    else:
        window = getattr(module, "sliding_window", None)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    position_bias = kwargs.get("position_bias")
    sinks = kwargs.get("s_aux")
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0

    args = (query, key, value, attention_mask, is_causal, window, dropout_p, scaling, softcap,
            position_bias, sinks)
    if position_bias is not None:
        return _fallback("position_bias", *args), None
    if sinks is not None:
        return _fallback("attention sinks (s_aux)", *args), None
    if query.shape[1] % max(key.shape[1], 1) != 0:
        return _fallback("query heads not a multiple of key/value heads", *args), None

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    try:
        if attention_mask is None:
            out = _dense(q, k, v, is_causal, window, dropout_p, scaling, softcap)
            if out is None:
                return _fallback("sliding window with more queries than keys", *args), None
            return out, None
        plan = getattr(attention_mask, _PLAN, None) if isinstance(attention_mask,
                                                                  torch.Tensor) else None
        if plan is not None and tuple(attention_mask.shape) == plan["shape"] and \
                plan["shape"][0] == query.shape[0] and plan["shape"][2] == query.shape[2] and \
                plan["shape"][3] == key.shape[2]:
            return _varlen(plan, q, k, v, dropout_p, scaling, softcap), None
    except NotImplementedError as e:
        return _fallback(str(e), *args), None
    return _fallback("attention mask (not causal + contiguous padding)", *args), None
