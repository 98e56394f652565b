#!/bin/bash
# The split-cache decode attention: GPU tests, the attention alone (bench/decode_attention_speed.py), then 8B decode
# with the attention on scaled_dot_product_attention (A, QUANTBENCH_DECODE_ATTENTION=sdpa) and on the split kernel
# (B), batches 1 and 8, order A B, then batch 1 again B A. Carried: .gpu/wheels, .gpu/cache_xreg.tar.xz,
# .gpu/cache_bound.tar.xz.
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda,mma
mkdir -p /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_split_attention.py tests/test_decode_attention.py \
  2>&1 | tail -15 > $OUT/tests.log
stamp "tests rc $?"
timeout 120 python3 bench/decode_attention_speed.py --json $OUT/attention.json 2>&1 | grep -v -i warn \
  > $OUT/attention.log
stamp "attention rc $?"
one() {  # name, attention kernel, batches
  local left=$(( 570 - $(date +%s) + start ))
  [ $left -lt 60 ] && { stamp "$1 skipped"; return; }
  QUANTBENCH_DECODE_ATTENTION=$2 timeout $left python3 bench/kernel_speed.py --device cuda --skip-matmul \
    --engines cuda,mma --size 8b --prompt 1 --decode-batches $3 --only-fused --compile --head --pdl \
    --variants int4-g128 --json $OUT/$1.json 2>&1 | grep -v -i warn > $OUT/$1.log
  stamp "$1 rc $?"
  grep "^decode" $OUT/$1.log | sed "s/^/$1: /" | sed 's/(8b.*cache 265)//'
}
one A_sdpa sdpa "1 8"
one B_split split "1 8"
one B_split_again split 1
one A_sdpa_again sdpa 1
cat $OUT/tests.log $OUT/attention.log
