#!/usr/bin/env bash
# The GPU check, one command for a CUDA machine (about 6-8 minutes on one H100):
#
#   1. the kernel tests, Triton compiled (not interpreted) against the PyTorch reference;
#   2. benchmarks/step_time.py on CUDA: every optimizer and backend (fused/foreach AdamW; AdamMini,
#      Eve and MicroAdam eager, compiled and Triton) on GPT-2 small, ratios to fused AdamW;
#   3. benchmarks/fsdp_one_gpu.py: a one-GPU lowmem_fsdp training run in bf16 mixed precision,
#      and one with cpu_offload=True (the optimizer state in CPU memory, stepped by the C kernel);
#   4. one table of the results, headed by the device's name.
#
#   bash benchmarks/gpu_check.sh              # outputs in gpu_check_out/ (GPU_CHECK_OUT sets it)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Exits 2 without CUDA, 1 if a part failed (the table still prints what ran).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu_check_out}
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine." >&2
    exit 2
fi

status=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" >&2
    if ! timeout "$limit" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"; then
        echo "gpu_check.sh: $name failed (see $OUT/$name.txt and $OUT/$name.err)" >&2
        status=1
    fi
}

# TRITON_INTERPRET=0: the kernels compiled for the GPU, whatever the environment says
part kernel_tests 200 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels
part step_time 120 "$PYTHON" benchmarks/step_time.py --device cuda --rounds 20 --json
part fsdp_bf16 60 "$PYTHON" benchmarks/fsdp_one_gpu.py --device cuda --precision bf16-mixed
part fsdp_offload 90 "$PYTHON" benchmarks/fsdp_one_gpu.py --device cuda --precision bf16-mixed --cpu-offload

"$PYTHON" benchmarks/gpu_check_table.py "$OUT" || status=1
exit $status
