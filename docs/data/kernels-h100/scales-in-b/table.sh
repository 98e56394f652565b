#!/bin/bash
# The tensor-core range of the table at this code (scales in B below 64 rows offered, split-K's new
# adding): batches 64, 32, 16 and 8, engines cuda and mma, five kinds, four shapes, against fp16 and tinygemm in
# the same run. Carried: .gpu/wheels, .gpu/cache_final.tar.xz. Usage: [SHAPES="4096x4096 …"] [BATCHES="64 32"]
# table.sh [LIMIT seconds, default 450]
set -o pipefail
OUT_FINAL=$OUT; OUT=/tmp/t; mkdir -p $OUT
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/cache_final.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout $(( ${1:-450} - $(date +%s) + start )) python3 bench/kernel_speed.py --device cuda --repeat 10 \
  --skip-decode --engines cuda,mma --batches ${BATCHES:-64 32 16 8} \
  ${SHAPES:+--shapes $SHAPES} --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 \
  nvfp4 --json $OUT/table.json 2>&1 | grep -v -i warn > $OUT/table.log
stamp "table rc $?"
cat $OUT/table.log
tar cJf $OUT_FINAL/table.tar.xz -C $OUT .
