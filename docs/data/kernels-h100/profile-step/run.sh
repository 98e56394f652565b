#!/bin/bash
# Written 2026-12-06, not yet run: where an 8B decode step's time goes with the decode attention on grouped heads,
# lm_head packed and dependent launch (the setting of the latest decode figures), batches 1 and 8, fp16, int4 and
# the floor without weight matmuls; batch 8 also on transformers' sdpa. Carried: .gpu/wheels,
# .gpu/cache_xreg.tar.xz, .gpu/cache_bound.tar.xz (the libraries of packed_gemv.cu as at 91c55ef and of
# packed_mma.cu). Writes under $OUT as it goes.
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda,mma
mkdir -p /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
one() {  # name, then decode_profile's arguments
  local left=$(( 560 - $(date +%s) + start ))
  [ $left -lt 60 ] && { stamp "$1 skipped"; return; }
  timeout $left python3 bench/decode_profile.py --size 8b --compile --head --pdl --variants int4-g128 ${@:2} \
    --json $OUT/$1.json 2>&1 | grep -v -i warn > $OUT/$1.log
  stamp "$1 rc $?"
}
one b1 --batch 1
one b8 --batch 8
one b8_sdpa --batch 8 --attention sdpa --no-floor
grep -h -A7 "^fp16\|^int4\|^no matmul" $OUT/b1.log $OUT/b8.log | grep -v "^ *[0-9.]* µs .*×" 
