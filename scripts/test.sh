#!/usr/bin/env bash
# Sets up, builds and runs Orchard's test suite: a Release build, then the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer. Exits non-zero on any failure.
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

echo "== Release build"
run_suite build -DCMAKE_BUILD_TYPE=Release
echo "== AddressSanitizer + UndefinedBehaviorSanitizer build"
run_suite build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DORCHARD_SANITIZE=address,undefined
