#!/usr/bin/env bash
# Builds orchard_bench (Release), runs it into <out>/bench_cpu.json, plots it. Usage: [out_dir]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build-bench/results}
build=$root/build-bench
mkdir -p "$out"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DORCHARD_BUILD_TESTS=OFF
cmake --build "$build" --target orchard_bench -j "${JOBS:-2}"

# Timings are only as good as the machine is quiet: say so when it is not.
echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
# 3 repetitions of >= 0.3 s each (the plot takes the best): about 2.5 minutes on 2 cores.
"$build/bench/orchard_bench" --benchmark_min_time="${MIN_TIME:-0.3}" \
    --benchmark_repetitions=3 --benchmark_display_aggregates_only=true \
    --benchmark_out="$out/bench_cpu.json" --benchmark_out_format=json
echo "load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"

if ! python3 -c 'import matplotlib' 2>/dev/null; then
    python3 -m pip install --quiet matplotlib || echo "matplotlib unavailable: no plot"
fi
if python3 -c 'import matplotlib' 2>/dev/null; then
    python3 "$root/bench/plot_cpu_bench.py" "$out/bench_cpu.json" --png "$out/bench_cpu.png"
fi
