// Tile sizes of the CPU kernels: a pure function of the head dims, unit-tested.
#pragma once

#include <algorithm>
#include <cstdint>

namespace orchard::cpu {

struct TileSize {
    int64_t block_q;  // query rows per tile (and per forward / dQ task)
    int64_t block_k;  // key rows per tile (and per dK/dV task)
};

// Working set of a tile pair: Q (bq, D), K^T (D, bk), V (bk, Dv), S and P (bq, bk), acc (bq, Dv).
inline TileSize tile_size(int64_t D, int64_t Dv) {
    // Small heads: larger tiles amortise the per-tile softmax and packing; 128 x 128 keeps the
    // working set ((2 * 128 + 128) * 128 + 2 * 128 * 128 floats ~ 320 KiB at D + Dv = 128)
    // inside a 1-2 MiB L2.
    if (D + Dv <= 128) return {128, 128};
    // Up to D = Dv = 256: 64 x 64 keeps it near 260 KiB.
    return {64, 64};
}

// Queries per pass of the forward on the fp32 GEMMs: a block of block_q queries meets each
// (k, v) block in passes of 48 queries, so the k and v blocks are packed once per block while
// S^T (64, 48) stays in L1. 48 rows are whole register blocks of the P V product (6 rows on
// AVX2, 8 on AVX-512).
inline constexpr int64_t kFwdPassQ = 48;

// Tiles of the forward on the fp32 GEMMs: block_q a multiple of kFwdPassQ, 64-key blocks.
// Larger blocks pack k and v less often; past these sizes the block's q^T and accumulator leave
// L2. Same-run comparisons on a 2-core Zen 3 (AVX2), against the 96 x 64 tiles of one pass
// before: D = 64 192 x 64 +1-5% (288: -1-4%), D = 128 288 x 64 +1-3%, D = 256 144 x 64 +5%
// (over 64 x 64); 96- or 128-key blocks were 1-13% slower.
inline TileSize fwd_tile_size(int64_t D, int64_t Dv) {
    if (D + Dv <= 128) return {192, 64};
    if (D + Dv <= 256) return {288, 64};
    return {144, 64};
}

// Query blocks per task of the forward on the fp32 GEMMs. A task packs the k / v rows its blocks
// see once for all of them, so fewer, larger tasks pack less: whole heads while that leaves at
// least 4 tasks per thread (in-process A/B on a 2-core Xeon, against one block per task: D = 64
// and 128, S = 512-4096, +1-12% on 2 threads), else heads are split into as many tasks as that
// needs.
inline int64_t fwd_blocks_per_task(int64_t heads, int64_t blocks, int threads) {
    const int64_t tasks_per_head = std::min(blocks, (4 * int64_t(threads) + heads - 1) / heads);
    return blocks / tasks_per_head;  // rounded down: at least tasks_per_head tasks
}

// Tiles of the backward on the fp32 GEMMs: 96 x 96, whole register blocks as above. On a 2-core
// Zen 3 it ran 0-12% faster than tile_size()'s 64 x 64 at D = 128 and 128 x 128 at D = 64.
inline TileSize bwd_tile_size(int64_t D, int64_t Dv) {
    if (D + Dv <= 256) return {96, 96};
    return {64, 64};
}

// The most memory one task of the backward's fused pass may hold in private buffers (its dQ
// accumulator; its packed q and dout); threads of them are live at once.
inline constexpr int64_t kMaxTaskBufferBytes = int64_t(64) << 20;

// Whether the backward computes dQ inside the dK/dV pass (5 block matmuls instead of 7). That
// pass then runs one task per (batch, kv head) with a private dQ buffer of `dq_bytes`.
inline bool fuse_dq(int64_t kv_tasks, int threads, int64_t dq_bytes, bool varlen) {
    // Unequal sequences make per-sequence tasks uneven: fuse only with many tasks per thread.
    if (varlen && kv_tasks < 8 * int64_t(threads)) return false;
    // Every thread needs a task, and the last round of tasks must be >= 80% full (the fused
    // pass saves 2 of 7 matmuls, so up to 1.25x imbalance still wins).
    const int64_t rounds = (kv_tasks + threads - 1) / threads;
    if (kv_tasks < threads || 4 * rounds * threads > 5 * kv_tasks) return false;
    return dq_bytes <= kMaxTaskBufferBytes;
}

// The same choice for the bf16-GEMM backward, from the problem alone (never the thread count), so
// that its results do not depend on the thread count: its fused and two-pass variants round dS
// in different orientations. 16 (batch, kv head) pairs keep up to 16 threads busy.
inline bool fuse_dq_bf16(int64_t kv_tasks, int64_t dq_bytes, bool varlen) {
    return !varlen && kv_tasks >= 16 && dq_bytes <= kMaxTaskBufferBytes;
}

}  // namespace orchard::cpu
