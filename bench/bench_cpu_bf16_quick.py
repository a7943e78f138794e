"""A quick same-run check of Orchard's bf16 CPU path against PyTorch's CPU SDPA at two shapes
(B * S = 8192 tokens, Hq * D = 1024; hdim 128 non-causal and hdim 64 causal, S = 2048): forward
and backward GFLOP/s (DESIGN.md's FLOP convention), median of 3 after a warm-up. For machines
where the full bench/bench_torch_cpu.py run is too long (the GPU host's CPU). ORCHARD_CPU_SIMD in
the environment picks the path (e.g. avx512_bf16: no AMX).

    python bench/bench_cpu_bf16_quick.py [threads]
"""

import os
import sys

import torch
import torch.nn.functional as F
from bench_torch_cpu import timed
from torch.nn.attention import SDPBackend, sdpa_kernel

import orchard


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for S, D, causal in ((2048, 128, False), (2048, 64, True)):
        B, H = 8192 // S, 1024 // D
        q, k, v = (torch.randn(B, S, H, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

        def orchard_fwd():
            return orchard.flash_attn_func(q, k, v, causal=causal)

        def sdpa_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as bench_torch_cpu.py
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        with torch.no_grad():
            t_of, t_sf = timed(orchard_fwd, 3), timed(sdpa_fwd, 3)
        t_ofb = timed(lambda: orchard_fwd().float().sum().backward(), 3)
        t_sfb = timed(lambda: sdpa_fwd().float().sum().backward(), 3)
        print(f"{os.environ.get('ORCHARD_CPU_SIMD', 'default'):8} threads {threads} S {S} D {D} "
              f"causal {int(causal)}: fwd Orchard {flops / t_of / 1e9:6.0f} SDPA {flops / t_sf / 1e9:6.0f} "
              f"GFLOP/s | bwd Orchard {2.5 * flops / (t_ofb - t_of) / 1e9:6.0f} "
              f"SDPA {2.5 * flops / (t_sfb - t_sf) / 1e9:6.0f}", flush=True)


if __name__ == "__main__":
    main()
