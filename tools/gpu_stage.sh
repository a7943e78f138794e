#!/usr/bin/env bash
# Builds what tools/gpu_check.sh runs into .gpu/ (git-ignored; carried to the GPU machine, which
# has no Highway headers to build the CPU part): the C++ test binary and the Python package
# with its compiled ops. Extra CMake options pass through, e.g. -DORCHARD_CUDA_HEADDIMS="64;128".
# STAGE names the folder (default .gpu; gpu_check.sh's ptx step reads .gpu-ptx), built in
# build-$STAGE without the dot.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${STAGE:-.gpu}
build=build-${stage#.}
cmake -S . -B "$build" -G Ninja -DORCHARD_CUDA=ON -DORCHARD_TORCH=ON -DORCHARD_BUILD_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=Release "$@" > /dev/null
cmake --build "$build" -j "$(nproc)"
rm -rf "$stage"
mkdir -p "$stage/site"
cp "$build/tests/cpp/orchard_tests" "$stage/"
cp -r python/orchard "$stage/site/"
cp "$build/bindings/torch/_orchard_ops.so" "$stage/site/orchard/"
# The MSL sources where an installed package has them (bindings/torch/CMakeLists.txt).
mkdir -p "$stage/site/orchard/metal_src/metal" "$stage/site/orchard/metal_src/core"
cp src/metal/kernel_params.h src/metal/attention_common.h src/metal/attention_fwd.metal \
    src/metal/attention_bwd.metal "$stage/site/orchard/metal_src/metal/"
cp src/core/philox.h src/core/mask.h "$stage/site/orchard/metal_src/core/"
find "$stage/site" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$stage"
