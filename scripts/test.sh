#!/usr/bin/env bash
# Sets up, builds and runs Orchard's tests: the C++ suite (Release, then AddressSanitizer +
# UndefinedBehaviorSanitizer) and the Python suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

jobs=$(nproc)
run_suite() {  # $1 = build dir, remaining args = extra CMake options
    local dir=$1
    shift
    cmake -S . -B "$dir" -G Ninja -DORCHARD_BUILD_BENCH=OFF "$@" > /dev/null
    cmake --build "$dir" -j "$jobs"
    ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

echo "== C++ tests, Release build (with the CUDA kernels where nvcc is found; they run only on a GPU)"
run_suite build -DCMAKE_BUILD_TYPE=Release
echo "== C++ tests, AddressSanitizer + UndefinedBehaviorSanitizer build (host code only)"
run_suite build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DORCHARD_SANITIZE=address,undefined \
    -DORCHARD_CUDA=OFF
echo "== Python tests"
"${PYTHON:-python3}" -m pytest tests/python -q
