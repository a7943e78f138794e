// Small Metal kernels that exercise the emulator itself (tests/metal_emu/test_emulator.cpp):
// each either computes something checkable or breaks one rule the emulator must report.
#include <metal_stdlib>

using namespace metal;

namespace selftest {

// d (8, 8) = a b + c, with b loaded transposed when `transpose_b` (from bt = b^T in memory).
// One simdgroup; the operands go through threadgroup memory (3 x 64 floats).
[[kernel]] void matmul8(device const float* a [[buffer(0)]], device const float* bt [[buffer(1)]],
                        device const float* c [[buffer(2)]], device float* d [[buffer(3)]],
                        threadgroup float* smem [[threadgroup(0)]],
                        ushort lane [[thread_index_in_simdgroup]]) {
    for (int e = lane; e < 64; e += 32) {
        smem[e] = a[e];
        smem[64 + e] = bt[e];
        smem[128 + e] = c[e];
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 ma, mb, mc;
    simdgroup_load(ma, smem, 8);
    simdgroup_load(mb, smem + 64, 8, ulong2(0, 0), true);
    simdgroup_load(mc, smem + 128, 8);
    simdgroup_multiply_accumulate(mc, ma, mb, mc);
    simdgroup_store(mc, smem + 192, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = lane; e < 64; e += 32) d[e] = smem[192 + e];
}

// Per lane of each simdgroup: out[6 * tid + k] = lane's results of six simd functions.
[[kernel]] void shuffles(device float* out [[buffer(0)]],
                         uint tid [[thread_index_in_threadgroup]],
                         ushort lane [[thread_index_in_simdgroup]]) {
    const float x = float(lane);
    out[6 * tid + 0] = simd_shuffle_xor(x, ushort(5));
    out[6 * tid + 1] = simd_shuffle_down(x, ushort(3));
    out[6 * tid + 2] = simd_shuffle(x, ushort(31 - lane));
    out[6 * tid + 3] = simd_sum(x);
    out[6 * tid + 4] = simd_max(x * float(lane % 7));
    out[6 * tid + 5] = simd_broadcast(x + 100.0f, ushort(9));
}

// Threads reverse a threadgroup array (declared in the kernel, shared by the threadgroup)
// through a barrier: right only if the barrier holds and the array is one per threadgroup.
[[kernel]] void reverse(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                        uint tid [[thread_index_in_threadgroup]],
                        uint3 tgid [[threadgroup_position_in_grid]]) {
    threadgroup float smem[64];
    const uint n = 64, base = tgid.x * n;
    smem[tid] = in[base + tid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[base + tid] = smem[n - 1 - tid];
}

// A simdgroup_store read back by another lane without simdgroup_barrier: a race on the GPU,
// a stale value (threadgroup memory starts as NaN) in the emulator.
[[kernel]] void store_then_read(device float* out [[buffer(0)]], threadgroup float* smem [[threadgroup(0)]],
                                ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(2.0f);
    simdgroup_store(m, smem, 8);
    out[lane] = smem[63 - 2 * lane];
}

// Bug: only half the threadgroup reaches the barrier.
[[kernel]] void divergent_barrier(device float* out [[buffer(0)]],
                                  threadgroup float* smem [[threadgroup(0)]],
                                  uint tid [[thread_index_in_threadgroup]]) {
    smem[tid] = 1.0f;
    if (tid < 32) threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = smem[tid];
}

// Bug: threads reach different barriers.
[[kernel]] void mismatched_barriers(uint tid [[thread_index_in_threadgroup]]) {
    if (tid % 2 == 0)
        threadgroup_barrier(mem_flags::mem_threadgroup);
    else
        threadgroup_barrier(mem_flags::mem_device);
}

// Bug: a simd reduction inside a branch that splits the simdgroup.
[[kernel]] void divergent_simd_sum(device float* out [[buffer(0)]],
                                   ushort lane [[thread_index_in_simdgroup]]) {
    float x = 1.0f;
    if (lane < 16) x = simd_sum(x);
    out[lane] = x;
}

// Bug: the last thread writes one element past the end.
[[kernel]] void write_past_end(device float* out [[buffer(0)]],
                               uint tid [[thread_index_in_threadgroup]]) {
    out[tid + (tid == 63 ? 1 : 0)] = 1.0f;
}

// Bug: reads threadgroup memory below its start.
[[kernel]] void read_before_smem(device float* out [[buffer(0)]],
                                 threadgroup float* smem [[threadgroup(0)]],
                                 uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float* p = smem - 1;
    out[tid] = p[tid];
}

}  // namespace selftest
