// gemm_bf16.h on compilers or CPUs without AVX512-BF16: simd_level() never reports avx512_bf16
// there, so nothing calls these; they exist so that the kernels link.
#include <cstdlib>

#include "cpu/gemm_bf16.h"

namespace orchard::cpu {

void gemm_bf16(bool, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint32_t*,
               int64_t, float*, int64_t, const float*) {
    std::abort();
}
void pairs_from_f32(uint32_t*, int64_t, const float*, int64_t, int64_t, int64_t) { std::abort(); }
void bf16_from_f32(uint16_t*, int64_t, const float*, int64_t, int64_t, int64_t) { std::abort(); }
void bf16_from_f32_transposed(uint16_t*, int64_t, const float*, int64_t, int64_t, int64_t,
                              int64_t) {
    std::abort();
}

bool gemm_bf16_compiled() { return false; }

}  // namespace orchard::cpu
