// gemm_bf16_amx on compilers without AMX intrinsics: amx_usable() is false, so simd_level() never
// reports amx and nothing calls gemm_bf16_amx.
#include <cstdlib>

#include "cpu/gemm_bf16.h"

namespace orchard::cpu {

bool amx_usable() { return false; }

void gemm_bf16_amx(bool, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint32_t*,
                   int64_t, float*, int64_t) {
    std::abort();
}

}  // namespace orchard::cpu
