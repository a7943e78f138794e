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
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
