// bf16 block GEMMs with fp32 accumulation on AMX tiles (`tdpbf16ps`) where the CPU and OS allow,
// else on the AVX512-BF16 dot-product instruction (`vdpbf16ps`), and the packing into their
// common operand layout. Used by the kernels for bf16 inputs when simd_level() >=
// SimdLevel::avx512_bf16 (see docs/cpu_backend.md).
//
// Layouts (the "pair" or VNNI layout that AMX tiles use too):
//   A (M, K)  bf16 row-major, leading dim lda (in bf16 elements), K even: a row's elements
//             k and k + 1 form one 32-bit word that is broadcast.
//   B (K, N)  packed as (K / 2, N) 32-bit words, leading dim ldb (in words): word (k2, n) holds
//             B(2 k2, n) in its low half and B(2 k2 + 1, n) in its high half.
// An odd K is padded with a zero column of A and a zero half-word of B.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/dtype_convert.h"

namespace orchard::cpu {

// C (M, N) = A (M, K) * B (K, N), or C = C diag(col_scale) + A * B when accumulate (col_scale
// optional: one factor per column, the online softmax's rescale when columns are queries).
// K2 = K / 2 (pairs); N a multiple of 16; C row-major fp32 with leading dim ldc.
void gemm_bf16(bool accumulate, int64_t M, int64_t N, int64_t K2, const uint16_t* a,
               int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
               const float* col_scale = nullptr);

// B operand from an fp32 tile: dst (ceil(rows / 2), n) words <- src (rows, n) with leading dim
// lds, rounded to bf16 (nearest even); an odd last row is paired with zeros. n a multiple of 16.
void pairs_from_f32(uint32_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                    int64_t n);

// gemm_bf16 over K elements, K odd allowed: element K of A's rows (past the tile: maybe another
// query's or key's value, maybe not finite) is never read; the last pair is copied into scratch
// (2 M bf16) with a zero partner.
inline void gemm_bf16_k(bool accumulate, int64_t M, int64_t N, int64_t K, const uint16_t* a,
                        int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                        const float* col_scale, uint16_t* scratch) {
    gemm_bf16(accumulate, M, N, K / 2, a, lda, b, ldb, c, ldc, col_scale);
    if (K % 2 == 0) return;
    for (int64_t i = 0; i < M; ++i) scratch[2 * i] = a[i * lda + K - 1], scratch[2 * i + 1] = 0;
    gemm_bf16(true, M, N, 1, scratch, 2, b + K / 2 * ldb, ldb, c, ldc);
}

// A operand from an fp32 tile: dst (rows, n) bf16 <- src (rows, n), rounded to nearest even.
// n a multiple of 16.
void bf16_from_f32(uint16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows,
                   int64_t n);

// A operand from an fp32 tile, transposed: dst (n, rows_pad) bf16 <- src (rows, n)^T, columns
// rows..rows_pad zero. n a multiple of 16.
void bf16_from_f32_transposed(uint16_t* dst, int64_t ldd, const float* src, int64_t lds,
                              int64_t rows, int64_t n, int64_t rows_pad);

// Whether this build holds the kernels (false: the stub of compilers without -mavx512bf16).
bool gemm_bf16_compiled();

// Whether the CPU has AMX-BF16 and the OS granted this process the tile state (asks once per
// call: simd_level() calls it once). False in builds without the AMX kernel.
bool amx_usable();

// The AMX part of gemm_bf16 (same arguments, no col_scale): M and K2 multiples of 16.
void gemm_bf16_amx(bool accumulate, int64_t M, int64_t N, int64_t K2, const uint16_t* a,
                   int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc);

// Packing of strided bf16 inputs (scalar: they are O(rows x D) per block, the GEMMs O(rows x
// cols x D)).

// A operand: dst (rows, cols_pad) <- src (rows, cols) strided, columns cols..cols_pad zero.
inline void pack_bf16_rows(uint16_t* dst, int64_t ld, const bfloat16_t* src, int64_t s_row,
                           int64_t s_col, int64_t rows, int64_t cols, int64_t cols_pad) {
    for (int64_t r = 0; r < rows; ++r) {
        if (s_col == 1)
            std::memcpy(dst + r * ld, src + r * s_row, 2 * cols);
        else
            for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = src[r * s_row + c * s_col].bits;
        for (int64_t c = cols; c < cols_pad; ++c) dst[r * ld + c] = 0;
    }
}

// A operand, transposed: dst (cols, rows_pad) <- src (rows, cols)^T, columns rows..rows_pad zero.
inline void pack_bf16_transposed(uint16_t* dst, int64_t ld, const bfloat16_t* src,
                                 int64_t s_row, int64_t s_col, int64_t rows, int64_t cols,
                                 int64_t rows_pad) {
    for (int64_t c = 0; c < cols; ++c) {
        for (int64_t r = 0; r < rows; ++r) dst[c * ld + r] = src[r * s_row + c * s_col].bits;
        for (int64_t r = rows; r < rows_pad; ++r) dst[c * ld + r] = 0;
    }
}

// B operand X^T for X = src (rows, cols) strided: dst (ceil(cols / 2), n_pad) words, word
// (c2, r) = (X(r, 2 c2), X(r, 2 c2 + 1)); rows..n_pad and an odd last column are zero.
inline void pack_bf16_pairs_transposed(uint32_t* dst, int64_t ld, const bfloat16_t* src,
                                       int64_t s_row, int64_t s_col, int64_t rows, int64_t cols,
                                       int64_t n_pad) {
    for (int64_t c2 = 0; 2 * c2 < cols; ++c2) {
        const bool pair = 2 * c2 + 1 < cols;
        for (int64_t r = 0; r < rows; ++r) {
            const bfloat16_t* x = src + r * s_row + 2 * c2 * s_col;
            dst[c2 * ld + r] = uint32_t(x[0].bits) | (pair ? uint32_t(x[s_col].bits) << 16 : 0u);
        }
        for (int64_t r = rows; r < n_pad; ++r) dst[c2 * ld + r] = 0;
    }
}

// B operand X for X = src (rows, cols) strided: dst (ceil(rows / 2), n_pad) words, word
// (r2, c) = (X(2 r2, c), X(2 r2 + 1, c)); cols..n_pad and an odd last row are zero.
inline void pack_bf16_pairs(uint32_t* dst, int64_t ld, const bfloat16_t* src, int64_t s_row,
                            int64_t s_col, int64_t rows, int64_t cols, int64_t n_pad) {
    for (int64_t r2 = 0; 2 * r2 < rows; ++r2) {
        const bool pair = 2 * r2 + 1 < rows;
        for (int64_t c = 0; c < cols; ++c) {
            const bfloat16_t* x = src + 2 * r2 * s_row + c * s_col;
            dst[r2 * ld + c] = uint32_t(x[0].bits) | (pair ? uint32_t(x[s_row].bits) << 16 : 0u);
        }
        for (int64_t c = cols; c < n_pad; ++c) dst[r2 * ld + c] = 0;
    }
}

}  // namespace orchard::cpu
