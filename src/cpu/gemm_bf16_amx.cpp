// The bf16 GEMM of gemm_bf16.h on AMX tiles (Sapphire Rapids and later): the part of C whose
// rows and K come in whole tiles; gemm_bf16() does the ragged rest on AVX512-BF16. Compiled with
// -mamx-tile -mamx-bf16; runs only after simd_level() reported amx, i.e. after amx_usable().
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cstring>

#include "cpu/gemm_bf16.h"

namespace orchard::cpu {
namespace {

// Linux's arch_prctl request for the right to use the AMX tile data state (XTILEDATA = 18).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

// Palette 1: tmm0-3 hold C (16 rows x 16 fp32), tmm4-5 A (16 rows x 16 pairs), tmm6-7 B
// (16 pair rows x 16 columns of pairs): every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// C (16 MT, 16 NT) (+)= A (16 MT, 2 K2) B, K2 a multiple of 16: MT x NT accumulator tiles, each
// A and B tile loaded once per 16 pairs of K and used NT resp. MT times.
template <int MT, int NT>
void tile_block(bool accumulate, int64_t K2, const uint16_t* a, int64_t lda, const uint32_t* b,
                int64_t ldb, float* c, int64_t ldc) {
    const int64_t sc = ldc * 4, sa = lda * 2, sb = ldb * 4;  // strides in bytes
    if (accumulate) {
        _tile_loadd(0, c, sc);
        if constexpr (NT > 1) _tile_loadd(1, c + 16, sc);
        if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, sc);
        if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
    } else {
        _tile_zero(0);
        if constexpr (NT > 1) _tile_zero(1);
        if constexpr (MT > 1) _tile_zero(2);
        if constexpr (MT > 1 && NT > 1) _tile_zero(3);
    }
    for (int64_t k2 = 0; k2 < K2; k2 += 16) {
        _tile_loadd(4, a + 2 * k2, sa);
        if constexpr (MT > 1) _tile_loadd(5, a + 16 * lda + 2 * k2, sa);
        _tile_loadd(6, b + k2 * ldb, sb);
        if constexpr (NT > 1) _tile_loadd(7, b + k2 * ldb + 16, sb);
        _tile_dpbf16ps(0, 4, 6);
        if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
        if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
        if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, sc);
    if constexpr (NT > 1) _tile_stored(1, c + 16, sc);
    if constexpr (MT > 1) _tile_stored(2, c + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

template <int MT>
void tile_rows(bool accumulate, int64_t N, int64_t K2, const uint16_t* a, int64_t lda,
               const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
    int64_t n = 0;
    for (; n + 32 <= N; n += 32) tile_block<MT, 2>(accumulate, K2, a, lda, b + n, ldb, c + n, ldc);
    if (n < N) tile_block<MT, 1>(accumulate, K2, a, lda, b + n, ldb, c + n, ldc);
}

}  // namespace

bool amx_usable() {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
    // The OS must grant the tile data state to this process (Linux >= 5.16); a refusal means
    // no AMX, not an error.
    return amx_bf16 && amx_tile &&
           syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

void gemm_bf16_amx(bool accumulate, int64_t M, int64_t N, int64_t K2, const uint16_t* a,
                   int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
    static const TileConfig config;
    _tile_loadconfig(&config);
    int64_t m = 0;
    for (; m + 32 <= M; m += 32)
        tile_rows<2>(accumulate, N, K2, a + m * lda, lda, b, ldb, c + m * ldc, ldc);
    if (m < M) tile_rows<1>(accumulate, N, K2, a + m * lda, lda, b, ldb, c + m * ldc, ldc);
    // Back to the init state, so that context switches do not save 8 KiB of tiles.
    _tile_release();
}

}  // namespace orchard::cpu
