// Tile sizes of the CPU kernels: a pure function of the head dims, unit-tested.
#pragma once

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

}  // namespace orchard::cpu
