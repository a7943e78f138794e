// The bf16 GEMM of gemm_bf16.h on AVX512-BF16 (vdpbf16ps: 16 fp32 lanes, each += the dot product
// of one pair of bf16 from A and one from B), handing whole tiles to AMX when simd_level() is
// amx. This file is compiled with -mavx512bf16; its functions run only after simd_level()
// reported avx512_bf16.
#include <immintrin.h>

#include <cstring>

#include "cpu/gemm_bf16.h"
#include "cpu/simd_dispatch.h"

namespace orchard::cpu {
namespace {

// C (MR, 16 NV) (+)= A (MR, 2 K2) * B: MR x NV accumulators; per pair step NV loads of B and MR
// broadcasts of one A word. MR = 8, NV = 2 uses 16 of the 32 registers and hides the 4-cycle
// latency of vdpbf16ps with 16 independent chains.
template <bool kAccumulate, int MR, int NV>
inline void gemm_block(int64_t K2, const uint16_t* a, int64_t lda, const uint32_t* b,
                       int64_t ldb, float* c, int64_t ldc, const float* col_scale) {
    __m512 acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
            if constexpr (kAccumulate) {
                acc[r][v] = _mm512_loadu_ps(c + r * ldc + 16 * v);
                if (col_scale != nullptr)
                    acc[r][v] = _mm512_mul_ps(acc[r][v], _mm512_loadu_ps(col_scale + 16 * v));
            } else {
                acc[r][v] = _mm512_setzero_ps();
            }
        }
    for (int64_t k2 = 0; k2 < K2; ++k2) {
        __m512bh bv[NV];
        for (int v = 0; v < NV; ++v)
            bv[v] = (__m512bh)_mm512_loadu_si512(b + k2 * ldb + 16 * v);
        for (int r = 0; r < MR; ++r) {
            int32_t word;
            std::memcpy(&word, a + r * lda + 2 * k2, 4);
            const __m512bh av = (__m512bh)_mm512_set1_epi32(word);
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <bool kAccumulate, int MR>
void gemm_rows(int64_t N, int64_t K2, const uint16_t* a, int64_t lda, const uint32_t* b,
               int64_t ldb, float* c, int64_t ldc, const float* col_scale) {
    auto scale_at = [&](int64_t n) { return col_scale ? col_scale + n : nullptr; };
    int64_t n = 0;
    for (; n + 32 <= N; n += 32)
        gemm_block<kAccumulate, MR, 2>(K2, a, lda, b + n, ldb, c + n, ldc, scale_at(n));
    for (; n < N; n += 16)
        gemm_block<kAccumulate, MR, 1>(K2, a, lda, b + n, ldb, c + n, ldc, scale_at(n));
}

template <bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K2, const uint16_t* a, int64_t lda, const uint32_t* b,
          int64_t ldb, float* c, int64_t ldc, const float* col_scale) {
    int64_t i = 0;
    for (; i + 8 <= M; i += 8)
        gemm_rows<kAccumulate, 8>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, col_scale);
    for (; i + 2 <= M; i += 2)
        gemm_rows<kAccumulate, 2>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, col_scale);
    for (; i < M; ++i)
        gemm_rows<kAccumulate, 1>(N, K2, a + i * lda, lda, b, ldb, c + i * ldc, ldc, col_scale);
}

}  // namespace

void gemm_bf16(bool accumulate, int64_t M, int64_t N, int64_t K2, const uint16_t* a,
               int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
               const float* col_scale) {
    auto vector_gemm = [&](int64_t m0, int64_t rows, int64_t k0, int64_t pairs, bool acc,
                           const float* scale) {
        const uint16_t* am = a + m0 * lda + 2 * k0;
        const uint32_t* bk = b + k0 * ldb;
        if (acc)
            gemm<true>(rows, N, pairs, am, lda, bk, ldb, c + m0 * ldc, ldc, scale);
        else
            gemm<false>(rows, N, pairs, am, lda, bk, ldb, c + m0 * ldc, ldc, nullptr);
    };
    // AMX takes the rows and pairs of K that fill whole 16 x 16 tiles; the vector kernel the
    // rest: the K tail of those rows (added after), and the last M % 16 rows.
    const int64_t m_tiles = M / 16 * 16, k_tiles = K2 / 16 * 16;
    if (simd_level() < SimdLevel::amx || m_tiles == 0 || k_tiles == 0) {
        vector_gemm(0, M, 0, K2, accumulate, col_scale);
        return;
    }
    if (accumulate && col_scale != nullptr)
        for (int64_t i = 0; i < m_tiles; ++i)
            for (int64_t n = 0; n < N; n += 16)
                _mm512_storeu_ps(c + i * ldc + n, _mm512_mul_ps(_mm512_loadu_ps(c + i * ldc + n),
                                                                _mm512_loadu_ps(col_scale + n)));
    gemm_bf16_amx(accumulate, m_tiles, N, k_tiles, a, lda, b, ldb, c, ldc);
    if (k_tiles < K2) vector_gemm(0, m_tiles, k_tiles, K2 - k_tiles, true, nullptr);
    if (m_tiles < M) vector_gemm(m_tiles, M - m_tiles, 0, K2, accumulate, col_scale);
}

void pairs_from_f32(uint32_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                    int64_t n) {
    // cvtne2ps gives (lo[0..15], hi[0..15]) as 32 bf16; the permutation interleaves them into
    // (lo[0], hi[0], lo[1], hi[1], ...), i.e. 16 pair words.
    alignas(64) int16_t order[32];
    for (int e = 0; e < 16; ++e) order[2 * e] = int16_t(e), order[2 * e + 1] = int16_t(16 + e);
    const __m512i interleave = _mm512_load_si512(order);
    for (int64_t r = 0; r < rows; r += 2) {
        const float* lo = src + r * lds;
        for (int64_t y = 0; y < n; y += 16) {
            const __m512 hi = r + 1 < rows ? _mm512_loadu_ps(lo + lds + y) : _mm512_setzero_ps();
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, _mm512_loadu_ps(lo + y));
            _mm512_storeu_si512(dst + (r / 2) * ldd + y, _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

void bf16_from_f32(uint16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                   int64_t n) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t y = 0; y < n; y += 16)
            _mm256_storeu_si256((__m256i*)(dst + r * ldd + y),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * lds + y)));
}

void bf16_from_f32_transposed(uint16_t* dst, int64_t ldd, const float* src, int64_t lds,
                              int64_t rows, int64_t n, int64_t rows_pad) {
    alignas(64) uint16_t row[16];
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t y = 0; y < n; y += 16) {
            _mm256_store_si256((__m256i*)row,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * lds + y)));
            for (int e = 0; e < 16; ++e) dst[(y + e) * ldd + r] = row[e];
        }
    for (int64_t y = 0; y < n; ++y)
        for (int64_t r = rows; r < rows_pad; ++r) dst[y * ldd + r] = 0;
}

bool gemm_bf16_compiled() { return true; }

}  // namespace orchard::cpu
