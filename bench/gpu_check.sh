#!/usr/bin/env bash
# One prepared run on a lent GPU (about 10 minutes): the kernel tests at real shapes (every codec), then the quick
# variants of the three benchmarks. Every log and JSON goes to $OUT (the device tool's folder) or out/.
# The GPU image has torch/triton/transformers but no gradio, gguf or the embedded model, so only the
# tests that need none of them run here. Nothing is installed there either: the benchmarks run as modules
# from the repository root (`python -m bench.NAME`), which puts kvcache and bench on the path.
#   bash bench/gpu_check.sh                 # everything, each step under its own time limit
#   STEPS="tests decode" bash bench/gpu_check.sh
#   STEPS="prefill" bash bench/gpu_check.sh  # the prefill kernel vs SDPA (not in the default run: time)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
steps=${STEPS:-"tests decode generate serving"}

run() {  # name, seconds, command...: log to $out/name.log, keep going when one step fails
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

for step in $steps; do
    case $step in
        tests) run tests 210 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_quant.py tests/test_cache.py tests/test_batching.py ;;
        decode) run bench_decode 220 $py -m bench.decode_attention --quick --json "$out/bench_decode_quick.json" ;;
        generate) run bench_generate 120 $py -m bench.generate --layers 8 --batch 16 --context 8192 --steps 32 --json "$out/bench_generate_quick.json" ;;
        serving) run bench_serving 120 $py -m bench.serving --layers 8 --requests 64 --cache-max-entry-count 600 --json "$out/bench_serving_quick.json" ;;
        prefill) run bench_prefill 90 $py -m bench.prefill_attention --quick --json "$out/bench_prefill_quick.json" ;;
        *) echo "unknown step $step (tests, decode, generate, serving, prefill)" ;;
    esac
done
