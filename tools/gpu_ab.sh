#!/usr/bin/env bash
# Same-run A/B of Orchard builds on a GPU machine: bench/ab_cuda.py for each build in turn, for
# ROUNDS rounds (SDPA's flash backend timed in the first), then each build's best round against
# the first build's, and whether every build computed the same outputs. A build is a folder to
# put on PYTHONPATH (e.g. a copy of .gpu/site holding another _orchard_ops.so).
#   bash tools/gpu_ab.sh ROUNDS SITE_A SITE_B [...] [-- ab_cuda.py options]
# Appends the JSON lines to $OUT/ab.jsonl (default ./gpu-out) and prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
rounds=$1
shift
sites=()
while (($#)) && [[ $1 != -- ]]; do
    sites+=("$1")
    shift
done
(($#)) && shift  # the --
for ((r = 1; r <= rounds; r++)); do
    for site in "${sites[@]}"; do
        flash=()
        ((r == 1)) && [[ $site == "${sites[0]}" ]] && flash=(--flash)
        PYTHONPATH=$site python3 bench/ab_cuda.py "$(basename "$site")" "${flash[@]}" "$@" \
            >> "$out/ab.jsonl"
    done
done
python3 - "$out/ab.jsonl" "$((rounds * ${#sites[@]}))" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])][-int(sys.argv[2]):]
builds = list(dict.fromkeys(r["build"] for r in rows))
for case in (k for k in rows[0] if k != "build"):
    sums = [k for k in rows[0][case] if k.endswith("_sum")]
    same = all(r[case][k] == rows[0][case][k] for r in rows for k in sums)
    for m in ("fwd", "bwd"):
        if m not in rows[0][case]:
            continue
        best = {b: max(r[case][m] for r in rows if r["build"] == b) for b in builds}
        flash = rows[0][case].get(f"flash_{m}")
        line = "  ".join(f"{b} {best[b]:.1f} ({best[b] / best[builds[0]]:.3f})" for b in builds)
        print(f"{case} {m}: {line}" + (f"  flash {flash:.1f}" if flash else "") +
              f"  same outputs: {same}")
PY
