#!/bin/bash
# The table at this code: batch 1 (engine cuda), then batches 2-64 (cuda,mma), five kinds, four shapes,
# against fp16 and tinygemm in the same runs.
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz (the CUDA-core and tensor-core libraries of the code since
# bfe895f: split-K's new adding in packed_mma.cu).
set -o pipefail
start=$(date +%s)
W=/tmp/h200; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/cache_final.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
V=("int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4)
timeout 150 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "${V[@]}" --json $W/matmul_b1.json 2>&1 | grep -v -i warn > $W/matmul_b1.log
stamp "b1 rc $?"
timeout $(( 570 - $(date +%s) + start )) python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode \
  --engines cuda,mma --batches 2 4 8 16 32 64 --variants "${V[@]}" --json $W/matmul_b2_64.json 2>&1 \
  | grep -v -i warn > $W/matmul_b2_64.log
stamp "b2-64 rc $?"
tar cJf $OUT/h200.tar.xz -C $W .
cat $W/matmul_b1.log $W/matmul_b2_64.log $W/times.log
