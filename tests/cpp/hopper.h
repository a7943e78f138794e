// For the tests of the Hopper (sm_90a) building blocks: whether device 0 is one they can run on.
#pragma once

#include <cuda_runtime.h>

namespace orchard::test {

// Compute capability 9.0 exactly: sm_90a code runs on no other.
inline bool have_hopper() {
    int n = 0, major = 0, minor = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
    return major == 9 && minor == 0;
}

}  // namespace orchard::test
