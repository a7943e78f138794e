#!/usr/bin/env bash
# Builds what tools/gpu_check.sh runs into .gpu/ (git-ignored; carried to the GPU machine, which
# has no Highway headers to build the CPU part): the C++ test binary and the Python package
# with its compiled ops. Extra CMake options pass through, e.g. -DORCHARD_CUDA_HEADDIMS="64;128".
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-gpu -G Ninja -DORCHARD_CUDA=ON -DORCHARD_TORCH=ON -DORCHARD_BUILD_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=Release "$@" > /dev/null
cmake --build build-gpu -j "$(nproc)"
rm -rf .gpu
mkdir -p .gpu/site
cp build-gpu/tests/cpp/orchard_tests .gpu/
cp -r python/orchard .gpu/site/
cp build-gpu/bindings/torch/_orchard_ops.so .gpu/site/orchard/
# The MSL sources where an installed package has them (bindings/torch/CMakeLists.txt).
mkdir -p .gpu/site/orchard/metal_src/metal .gpu/site/orchard/metal_src/core
cp src/metal/kernel_params.h src/metal/attention_common.h src/metal/attention_fwd.metal \
    src/metal/attention_bwd.metal .gpu/site/orchard/metal_src/metal/
cp src/core/philox.h src/core/mask.h .gpu/site/orchard/metal_src/core/
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
