#!/bin/bash
# A decode step's attention without copies of the cache (export/kernels/decode_attention.py) against
# transformers' sdpa, 8B decode with the step compiled, fp16 and int4 in each process (2026-12-06; see
# docs/performance.md, "A decode step's attention"). Carried: .gpu/wheels, .gpu/cache_xreg.tar.xz (CUDA-core
# libraries of this packed_gemv.cu), .gpu/cache_bound.tar.xz (tensor-core). Processes A (sdpa) and B
# (quantbench_sdpa) at batches 1 and 8, then B and A again at batch 1, as time allows. Run at 70f158a,
# when --attention had no default (A named none); since then it defaults to quantbench_sdpa, so A names sdpa.
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
one() {  # name, batches, extra arguments
  local left=$(( 520 - $(date +%s) + start ))
  [ $left -lt 60 ] && { stamp "$1 skipped"; return; }
  timeout $left python3 bench/kernel_speed.py --device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 1 \
    --decode-batches $2 --only-fused --compile --head --pdl --variants int4-g128 ${@:3} --json $OUT/$1.json 2>&1 \
    | grep -v -i warn > $OUT/$1.log
  stamp "$1 rc $?"
  grep "^decode" $OUT/$1.log | sed "s/^/$1: /" | sed 's/(8b.*cache 265)//'
}
one A_sdpa "1 8" --attention sdpa
one B_grouped "1 8" --attention quantbench_sdpa
one B_grouped_again 1 --attention quantbench_sdpa
one A_sdpa_again 1 --attention sdpa
