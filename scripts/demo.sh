#!/usr/bin/env bash
# Sets up, builds and runs Orchard's main job: a forward + backward check of the CPU kernels
# against the float64 reference, then the PyTorch training demo (`python -m orchard demo`, ~2 min
# on 2 CPU cores; extra arguments go to it). setup.sh installs torch and Orchard into this python3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "$(nproc)" --target orchard_check
./build/orchard_check
"${PYTHON:-python3}" -m orchard demo "$@"
