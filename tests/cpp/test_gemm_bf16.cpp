// The bf16 GEMMs (AMX tiles and AVX512-BF16) and their packing against a float64 GEMM of the same
// bf16 values, on sizes that are not multiples of the tiles. Skipped on CPUs without AVX512-BF16.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/gemm_bf16.h"
#include "cpu/simd_dispatch.h"

namespace orchard::cpu {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Bf16Matrix {
    int64_t rows, cols;
    std::vector<bfloat16_t> v;  // (rows, cols) row-major
    double at(int64_t r, int64_t c) const { return to_float(v[r * cols + c]); }
};

Bf16Matrix random_matrix(int64_t rows, int64_t cols, std::mt19937& gen) {
    std::normal_distribution<float> dist;
    Bf16Matrix m{rows, cols, std::vector<bfloat16_t>(rows * cols)};
    for (auto& x : m.v) x = to_bf16(dist(gen));
    return m;
}

// C (M, N) = A (M, K) B (K, N) (+ C0 diag(scale)) through gemm_bf16, vs float64. The bound is
// fp32 accumulation's: (K + 2) units of rounding of sum |a b| per element.
void check_gemm(int64_t M, int64_t N, int64_t K, bool accumulate, std::mt19937& gen) {
    const Bf16Matrix a = random_matrix(M, K, gen), b = random_matrix(K, N, gen);
    // An odd lda: rows (and so AMX tile rows and broadcast pairs) start 2-byte aligned.
    const int64_t kp = round_up(K, 2), np = round_up(N, 16), lda = kp + 7;
    std::vector<uint16_t> ap(M * lda, 0xFFFF);  // padding past kp is never read
    pack_bf16_rows(ap.data(), lda, a.v.data(), K, 1, M, K, kp);
    std::vector<uint32_t> bp(kp / 2 * np);
    pack_bf16_pairs(bp.data(), np, b.v.data(), N, 1, K, N, np);

    std::uniform_real_distribution<float> u(0.5f, 2.f);
    std::vector<float> c(M * np), c0(M * np), scale(np);
    for (auto& x : c0) x = u(gen);
    for (auto& x : scale) x = u(gen);
    c = c0;
    gemm_bf16(accumulate, M, np, kp / 2, ap.data(), lda, bp.data(), np, c.data(), np,
              accumulate ? scale.data() : nullptr);
    for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < np; ++j) {
            double want = accumulate ? double(c0[i * np + j]) * scale[j] : 0, mag = std::abs(want);
            for (int64_t k = 0; j < N && k < K; ++k) {
                want += a.at(i, k) * b.at(k, j);
                mag += std::abs(a.at(i, k) * b.at(k, j));
            }
            ASSERT_NEAR(c[i * np + j], want, double(K + 2) * 6e-8 * mag + 1e-30)
                << "C(" << i << ", " << j << ") of M=" << M << " N=" << N << " K=" << K
                << " accumulate=" << accumulate << " on " << to_string(simd_level());
        }
}

TEST(GemmBf16, MatchesFloat64OnRaggedSizes) {
    if (simd_level() < SimdLevel::avx512_bf16) GTEST_SKIP() << "no AVX512-BF16 (or capped)";
    std::mt19937 gen(7);
    // Sizes around the AMX tiles (16 rows, 16 pairs of K, 32 x 32 blocks) and the vector kernel's
    // 8 x 32 blocks.
    for (int64_t M : {1, 7, 16, 17, 33, 48, 130})
        for (int64_t N : {5, 16, 40, 64})
            for (int64_t K : {1, 2, 31, 32, 33, 64, 70, 128})
                for (bool accumulate : {false, true}) check_gemm(M, N, K, accumulate, gen);
}

TEST(GemmBf16, F32TilesRoundToNearestEven) {
    if (simd_level() < SimdLevel::avx512_bf16) GTEST_SKIP() << "no AVX512-BF16 (or capped)";
    std::mt19937 gen(3);
    std::normal_distribution<float> dist;
    const int64_t rows = 5, n = 32;
    std::vector<float> src(rows * n);
    for (auto& x : src) x = dist(gen);
    src[0] = bits_to_float(0x3F808000u);  // a tie: rounds to the even 0x3F80
    std::vector<uint32_t> pairs(3 * n);
    pairs_from_f32(pairs.data(), n, src.data(), n, rows, n);
    std::vector<uint16_t> plain(rows * n), transposed(n * 8);
    bf16_from_f32(plain.data(), n, src.data(), n, rows, n);
    bf16_from_f32_transposed(transposed.data(), 8, src.data(), n, rows, n, 8);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < n; ++c) {
            const uint16_t want = to_bf16(src[r * n + c]).bits;
            EXPECT_EQ(plain[r * n + c], want);
            EXPECT_EQ(transposed[c * 8 + r], want);
            EXPECT_EQ(uint16_t(pairs[r / 2 * n + c] >> (16 * (r % 2))), want);
        }
    for (int64_t c = 0; c < n; ++c) {
        EXPECT_EQ(pairs[2 * n + c] >> 16, 0u) << "odd last row pairs with zero";
        for (int64_t r = rows; r < 8; ++r) EXPECT_EQ(transposed[c * 8 + r], 0u);
    }
}

TEST(GemmBf16, AmxIsUsedWhereverTheOsGrantsIt) {
    const char* env = std::getenv("ORCHARD_CPU_SIMD");
    if (env != nullptr) GTEST_SKIP() << "level capped to " << env;
    EXPECT_EQ(simd_level() == SimdLevel::amx, gemm_bf16_compiled() && amx_usable());
}

}  // namespace
}  // namespace orchard::cpu
