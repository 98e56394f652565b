#!/bin/bash
# usage: bash .gpu/scripts/fold.sh — GPU tests of the folded MLP orders, then the compiled 8B decode at batch 1 with
# act_order folded out of the down projections and without (one process)
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc && tar xJf .gpu/cache_lookahead.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_mlp_order.py 2>&1 | tail -3 | tee $OUT/tests.log
stamp "tests rc $?"
timeout 470 python3 bench/kernel_speed.py --device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 1 \
  --decode-batches 1 8 --only-fused --compile --head --pdl --variants "int4-g128 act_order" --unfolded \
  --json $OUT/decode.json 2>&1 | grep -v -i warn | tee $OUT/decode.log
stamp "decode rc $?"
