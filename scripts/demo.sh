#!/usr/bin/env bash
# Sets up, builds and runs Orchard's main job: a forward + backward check of the CPU kernels
# against the float64 reference, then the PyTorch training demo (`python -m orchard demo`, ~2 min
# on 2 CPU cores; extra arguments go to it). setup.sh installs torch and Orchard into this python3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The CUDA kernels only where a GPU can run them (compiling them all takes minutes).
cuda=OFF
command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1 && cuda=AUTO
cmake -S . -B build-demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DORCHARD_CUDA=$cuda \
    -DORCHARD_BUILD_TESTS=OFF -DORCHARD_BUILD_BENCH=OFF > /dev/null
cmake --build build-demo -j "$(nproc)" --target orchard_check
./build-demo/orchard_check
"${PYTHON:-python3}" -m orchard demo "$@"
