#!/bin/bash
# usage: bash .gpu/scripts/run1.sh — GPU tests (bound calls, operator, dependent launch, L2 lookahead), the
# tensor-core kernel's fastest tile with each L2 lookahead (0, 2, 4 slabs) against fp16 at batches 64 and 32,
# five kinds; then NVFP4's eager call profiled
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc && tar xJf .gpu/cache_lookahead.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
stamp setup
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "bound or libraries_order or dependent or lookahead" 2>&1 | tail -6 | tee $OUT/tests.log
stamp "tests rc $?"
timeout $(( 440 - $(date +%s) + start )) python3 bench/kernel_tiles.py --engines mma --family lookahead \
  --batches 64 32 --variants int4-g128 "int4-g128 act_order" ternary2 mxfp4 nvfp4 --json $OUT/lookahead.json 2>&1 \
  | grep -v -i warn | tee $OUT/lookahead.log
stamp "lookahead rc $?"
QUANTBENCH_KERNEL_ENGINES=cuda timeout 40 python3 bench/launch_overhead.py --calls 300 --repeat 2 --profile \
  --variants nvfp4 int4-g128 2>&1 | grep -v -i warn | tee $OUT/launch_profile.log
stamp "profile rc $?"
