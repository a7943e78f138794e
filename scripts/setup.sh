#!/usr/bin/env bash
# Installs what Orchard needs (Debian / Ubuntu packages, Python packages from PyPI) and the
# orchard Python package itself, built from this checkout. Safe to run again: it skips what is
# already there (pip's cache serves PyTorch's wheels after the first run).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake ninja-build g++ pkg-config libhwy-dev libgtest-dev libbenchmark-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "orchard setup: installing ${missing[*]}"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
"$python" -m pip install -q --disable-pip-version-check "torch>=2.10" scikit-build-core \
    pytest hypothesis transformers matplotlib tqdm
# --no-build-isolation: build against the torch installed above instead of a second copy.
# The CUDA kernels are compiled into the package only where a GPU can run them (the C++ build of
# scripts/test.sh compiles them wherever nvcc is, as a check).
cuda=OFF
command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1 && cuda=AUTO
"$python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    -C cmake.define.ORCHARD_CUDA=$cuda .
