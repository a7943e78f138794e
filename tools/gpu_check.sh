#!/usr/bin/env bash
# One full check of the CUDA backend on a GPU machine, from builds made elsewhere (tools/
# gpu_stage.sh puts them in .gpu/): the C++ case list, the Python suite on CUDA,
# compute-sanitizer (memcheck, racecheck) on a small forward + backward, the training demo with
# --device cuda, and the benchmark against SDPA. Logs and results go to $OUT (default ./gpu-out).
#   bash tools/gpu_check.sh [tests|sanitize|cpu|demo|bench|all|ptx]...
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD/.gpu/site PYTHONUNBUFFERED=1
tests=.gpu/orchard_tests
status=0
log=$out/check.log
step() {  # name, command...: runs, appends to $out/check.log, shows the tail, remembers failure
    local name=$1 rc
    shift
    echo "== $name" | tee -a "$log"
    "$@" > "$out/step.tmp" 2>&1
    rc=$?
    cat "$out/step.tmp" >> "$log"
    tail -n 12 "$out/step.tmp"
    rm -f "$out/step.tmp"
    if ((rc != 0)); then
        echo "FAILED: $name (exit $rc)" | tee -a "$log"
        status=1
    fi
}
for what in "${@:-all}"; do
    case $what in
        tests | all)
            nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >> "$log"
            step cpp_cuda "$tests" --gtest_filter='Cuda*:CudaBackend*:Wgmma*:Tma*' --gtest_brief=1
            # The cp.async wgmma kernels on every case (by default only layouts TMA refuses take them),
            # and the mma.sync kernels (on Hopper the default is the wgmma ones).
            step cpp_cuda_cpasync env ORCHARD_CUDA_TMA=0 "$tests" --gtest_filter='Cuda/*:CudaWide/*' --gtest_brief=1
            step cpp_cuda_mma env ORCHARD_CUDA_WGMMA=0 "$tests" --gtest_filter='Cuda/*:CudaWide/*' --gtest_brief=1
            step py_cuda python3 -m pytest -q -x tests/python/test_cuda.py -p no:cacheprovider ;;&
        sanitize | all)
            step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$tests" \
                --gtest_filter='Cuda/*all_features_bfloat16*:Cuda/*varlen_float16*:Cuda/*hdim128_mqa*bfloat16*:CudaWide/*varlen_d64_float16*:Cuda/*hdim80_bfloat16*:CudaWide/*dropout_causal_gqa_d80_float16*:CudaWide/*dropout_causal_gqa_d64_bfloat16*:CudaWide/*window_causal_d192_float16*:CudaWide/*dropout_causal_gqa_d224_bfloat16*'
            step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$tests" \
                --gtest_filter='Cuda/*all_features_bfloat16*:Cuda/*hdim96_float16*:Cuda/*hdim128_mqa*bfloat16*:CudaWide/*varlen_d64_float16*:Cuda/*hdim80_bfloat16*:CudaWide/*dropout_causal_gqa_d80_float16*:CudaWide/*dropout_causal_gqa_d64_bfloat16*:CudaWide/*window_causal_d192_float16*:CudaWide/*dropout_causal_gqa_d224_bfloat16*' ;;&
        cpu | all)  # the CPU kernels on this host's CPU (AMX where it has it), C++ and Python
            step cpu_cases "$tests" --gtest_brief=1 \
                --gtest_filter='Cases*:Float64*:Determinism*:Backward*:SimdDispatch*:GemmBf16*:PositionOffsets*'
            step py_all python3 -m pytest -q -x tests/python -m "not inductor" -p no:cacheprovider ;;&
        ptx)  # a compute_80 PTX build (tools/gpu_stage.sh into .gpu-ptx), which the driver compiles
            # for this GPU: the sm_80 code path as an Ampere-only build would run it
            ptx=.gpu-ptx
            export CUDA_CACHE_PATH=/tmp/orchard-jit-cache CUDA_CACHE_MAXSIZE=4294967296
            step ptx_cpp "$ptx/orchard_tests" --gtest_filter='Cuda*:CudaBackend*' --gtest_brief=1
            step ptx_py env PYTHONPATH="$PWD/$ptx/site" python3 -m pytest -q -x tests/python/test_cuda.py \
                -p no:cacheprovider ;;
        demo | all)
            step demo python3 -m orchard demo --device cuda --steps 60 --out "$out/demo" ;;&
        bench | all)
            step bench python3 bench/bench_cuda.py --out "$out" ;;
    esac
done
exit $status
