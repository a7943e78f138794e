"""The CUDA backend through the PyTorch front end: the case list against the float64 reference
(and against PyTorch's own fp16/bf16 SDPA error on the same inputs), dropout masks equal to the
CPU backend's, the caller's stream and device, CUDA graphs, strided inputs, determinism.
Skipped where PyTorch sees no CUDA device (CI); run on the GPU machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import OUT_TOL, Config, assert_close, fwd_op, grads_of, leaves, orchard_attention, rel_err
from orchard import _ops
from reference import attention_ref
from test_attention import CASES

import orchard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float16, torch.bfloat16]
# The CPU case list minus what the CUDA kernels refuse by design (head dims not a multiple of 8,
# Dv != D), each of which has its own test below.
CUDA_CASES = {name: cfg for name, cfg in CASES.items()
              if cfg.d % 8 == 0 and (cfg.dv or cfg.d) == cfg.d}
CUDA_CASES.update({
    "d64_long": Config(b=2, sq=1000, sk=1000, hq=4, hkv=2, d=64, causal=True),
    "d80_phi2": Config(sq=300, sk=300, hq=4, hkv=4, d=80, causal=True),
    "d96": Config(sq=130, sk=257, hq=2, hkv=1, d=96),
    "d128_window": Config(b=2, sq=700, sk=700, hq=2, hkv=1, d=128, causal=True, window=(200, -1)),
    "d256": Config(sq=100, sk=170, hq=2, hkv=2, d=256),
    "d192_causal": Config(b=2, sq=300, sk=260, hq=2, hkv=1, d=192, causal=True),
    "d128_dropout": Config(sq=200, sk=260, hq=2, hkv=1, d=128, dropout_p=0.25, seed=99),
})


def to_cuda(options: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()}


def run_case(cfg: Config, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, dout = cfg.inputs(dtype, generator)
    options = cfg.options(generator)
    inputs = leaves(q.cuda(), k.cuda(), v.cuda())
    out, lse = orchard_attention(*inputs, **to_cuda(options))
    grads = grads_of(out, dout.cuda(), inputs)
    torch.cuda.synchronize()
    ref_options = {key: val for key, val in options.items() if not key.startswith("max_seqlen")}
    ref_inputs = leaves(q, k, v, dtype=torch.float64)
    out_ref, lse_ref = attention_ref(*ref_inputs, **ref_options)
    grads_ref = grads_of(out_ref, dout, ref_inputs)
    return (q, k, v, dout), (out, lse, grads), (out_ref, lse_ref, grads_ref)


def sdpa_errors(q, k, v, dout, cfg: Config):
    """PyTorch's own CUDA SDPA error (out, dq, dk, dv) on the same fp16/bf16 inputs, for problems
    SDPA can express (padded, no window/softcap/ALiBi/dropout)."""
    if cfg.varlen or cfg.window != (-1, -1) or cfg.softcap or cfg.alibi or cfg.dropout_p:
        return None
    if cfg.causal and cfg.sq != cfg.sk:
        return None  # SDPA's causal is top-left aligned
    def run(dtype, device):
        leaves_ = leaves(*(x.transpose(1, 2).to(device) for x in (q, k, v)), dtype=dtype)
        out = F.scaled_dot_product_attention(*leaves_, is_causal=cfg.causal, scale=cfg.scale,
                                             enable_gqa=cfg.hq != cfg.hkv)
        return [out, *grads_of(out, dout.transpose(1, 2).to(device), leaves_)]
    got = run(q.dtype, "cuda")
    ref = run(torch.float64, "cpu")
    return [rel_err(g.cpu(), r) for g, r in zip(got, ref)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CUDA_CASES)
def test_case_list(name, dtype):
    cfg = CUDA_CASES[name]
    (q, k, v, dout), (out, lse, grads), (out_ref, lse_ref, grads_ref) = run_case(cfg, dtype)
    errors = [rel_err(out.cpu(), out_ref)] + [rel_err(g.cpu(), r) for g, r in zip(grads, grads_ref)]
    tols = [OUT_TOL[dtype]] + [3 * OUT_TOL[dtype]] * 3
    for name_, err, tol in zip(("out", "dq", "dk", "dv"), errors, tols):
        assert err <= tol, f"{name_}: relative error {err:.3g} > {tol:.3g}"
    masked = torch.isinf(lse_ref)
    assert torch.equal(lse.cpu() == float("inf"), masked)
    torch.testing.assert_close(lse.cpu()[~masked].double(), lse_ref[~masked], rtol=1e-3, atol=1e-3)
    # No worse than 2x PyTorch's own SDPA error on the same inputs (where SDPA can run it).
    peer = sdpa_errors(q, k, v, dout, cfg)
    if peer is not None:
        for name_, err, err_peer, tol in zip(("out", "dq", "dk", "dv"), errors, peer, tols):
            assert err <= max(2 * err_peer, tol / 10), f"{name_}: {err:.3g} vs SDPA {err_peer:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_mask_equals_cpu(dtype):
    """Same seed and offset: the CUDA and CPU backends drop exactly the same elements (DESIGN.md's
    Philox mask), so with V = identity rows the zero pattern of P matches."""
    sq, sk, d = 96, 96, 96
    q = torch.randn(1, sq, 1, d, dtype=dtype)
    k = torch.randn(1, sk, 1, d, dtype=dtype)
    v = torch.eye(sk, d, dtype=dtype)[None, :, None, :]  # out[i, j] = P[i, j] for j < d
    opts = dict(dropout_p=0.4, seed=12345, offset=6)
    out_cpu, _ = fwd_op(q, k, v, **opts)
    out_gpu, _ = fwd_op(q.cuda(), k.cuda(), v.cuda(), **opts)
    dropped_cpu, dropped_gpu = out_cpu[0, :, 0] == 0, out_gpu.cpu()[0, :, 0] == 0
    assert dropped_cpu.float().mean().item() == pytest.approx(0.4, abs=0.05)
    assert torch.equal(dropped_cpu, dropped_gpu)
    assert_close("out", out_gpu.cpu(), out_cpu, 3 * OUT_TOL[dtype])


def test_runs_on_current_stream_and_graph_capture():
    """Work goes to the current stream (so a CUDA graph captures it) and allocates nothing
    outside PyTorch's allocator."""
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up on the side stream, as graph capture requires
            out = orchard.flash_attn_func(q, k, v, causal=True)
            out.sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    q.grad = k.grad = v.grad = None
    with torch.cuda.graph(graph):
        out = orchard.flash_attn_func(q, k, v, causal=True)
        out.float().pow(2).sum().backward()
    expected_out = out.detach().clone()
    with torch.no_grad():
        for x in (q, k, v):
            x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = orchard.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)
    assert_close("graph replay", out, ref, OUT_TOL[torch.bfloat16])
    assert rel_err(out, expected_out) > 1e-2  # the replay really recomputed


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one CUDA device")
def test_second_device():
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda:1", dtype=torch.float16) for _ in range(3))
    out = orchard.flash_attn_func(q, k, v)
    ref = orchard.flash_attn_func(q.cuda(0), k.cuda(0), v.cuda(0))
    assert out.device == q.device
    assert torch.equal(out.cuda(0), ref)


def test_strided_inputs_are_staged_visibly():
    """(B, H, S, D) transposed views run without a copy; a non-unit last stride is copied, counted."""
    base = torch.randn(1, 4, 200, 64, device="cuda", dtype=torch.bfloat16)
    q = base.transpose(1, 2)  # (B, S, H, D) view, unit last stride
    strided = torch.randn(1, 200, 4, 128, device="cuda", dtype=torch.bfloat16)[..., ::2]
    orchard.reset_stats()
    ref = orchard.flash_attn_func(q.contiguous(), q.contiguous(), strided.contiguous())
    out = orchard.flash_attn_func(q, q, strided)
    assert orchard.stats()["staging_copies"]["forward"] == 1
    assert torch.equal(out, ref)


def test_expanded_kv_gqa_gradients():
    q = torch.randn(2, 100, 8, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    kv = torch.randn(2, 100, 1, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    out = orchard.flash_attn_func(q, kv.expand(2, 100, 8, 64), kv.expand(2, 100, 8, 64))
    out.float().sum().backward()
    q2, kv2 = leaves(q, kv)
    out2 = orchard.flash_attn_func(q2, kv2, kv2)  # MQA: one kv head
    out2.float().sum().backward()
    assert_close("out", out, out2, 1e-3)
    assert_close("dkv", kv.grad, kv2.grad, 3e-3)  # the expand sums dk + dv over the heads


@pytest.mark.parametrize("D", [64, 128])
def test_deterministic_backward_is_bitwise_repeatable(D):
    # The head dims of the fused Hopper backward, whose dQ sums are atomic: `deterministic` takes
    # the two-kernel backward, bitwise repeatable; the default agrees with it to rounding.
    q, k, v = (torch.randn(2, 512, 4, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grads = []
    for deterministic in (True, True, False):
        out = orchard.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        grads.append(torch.autograd.grad(out.float().sum(), (q, k, v)))
    for name, a, b, default in zip("qkv", *grads):
        assert torch.equal(a, b), f"d{name}: two deterministic runs differ"
        assert_close(f"d{name}", default, a, 1e-2)


def test_refusals_are_clear():
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="CUDA backend supports fp16 and bf16"):
        orchard.flash_attn_func(q, q, q)
    q = torch.randn(1, 16, 2, 36, device="cuda", dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="multiples of 8"):
        orchard.flash_attn_func(q, q, q)


def test_sdpa_compatible_function_on_cuda():
    """orchard.scaled_dot_product_attention with CUDA tensors runs Orchard's kernels (no
    fallback) and matches PyTorch's SDPA (top-left causal, GQA) to bf16 accuracy, gradients too."""
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 400, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    orchard.reset_stats()
    ours, theirs = leaves(q, k, v), leaves(q, k, v)
    out = orchard.scaled_dot_product_attention(*ours, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(*theirs, is_causal=True, enable_gqa=True)
    assert orchard.stats()["fallbacks"]["forward"] == 0
    assert orchard.stats()["forward"]["cuda"] == 1
    assert_close("out", out, ref, 2 * OUT_TOL[torch.bfloat16])
    for name, g, g_ref in zip("qkv", grads_of(out, dout, ours), grads_of(ref, dout, theirs)):
        assert_close(f"d{name}", g, g_ref, 6 * OUT_TOL[torch.bfloat16])


@pytest.mark.parametrize("k_offset", [0, 3, 130])
def test_position_offsets_match_cpu(k_offset):
    """A ring step's call (query / key blocks at offsets in a longer sequence): the CUDA kernels
    give the CPU backend's out, lse and gradients, dropout mask included (odd key offsets split a
    key pair over two Philox calls)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 96, 4, 64, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 80, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    dout = torch.randn(2, 96, 4, 64, generator=g).to(torch.bfloat16)
    opts = dict(causal=True, window_size=(150, 0), dropout_p=0.3, seed=77, offset=5,
                alibi_slopes=torch.tensor([0.1, 0.2, 0.05, 0.3]), q_position_offset=200,
                k_position_offset=200 - 16 + k_offset)
    results = []
    for device in ("cpu", "cuda"):
        o = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in opts.items()}
        qd, kd, vd, dd = (x.to(device) for x in (q, k, v, dout))
        out, lse = fwd_op(qd, kd, vd, **o)
        rng = torch.tensor([o["seed"], o["offset"]], dtype=torch.int64)
        grads = _ops.call(_ops.ops.bwd, dd, qd, kd, vd, out, lse, None, None, 0, 0, o["dropout_p"],
                          None, True, 150, 0, 0.0, o["alibi_slopes"], rng, False, True, True, True,
                          "tests.bwd", o["q_position_offset"], o["k_position_offset"])
        results.append([out, lse, *grads])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b.cpu())), name
        assert_close(name, b.cpu()[finite].float(), a[finite].float(), 3 * OUT_TOL[torch.bfloat16])
