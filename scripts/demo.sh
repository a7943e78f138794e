#!/usr/bin/env bash
# Sets up, builds and runs Orchard's main job. Until the PyTorch training demo exists, that is a
# forward + backward check of the CPU kernels against the float64 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "$(nproc)" --target orchard_check
./build/orchard_check
