#!/bin/bash
# Run 2 (after the compiled path's fix, float32 scores): GPU tests, then 8B decode on the split kernel (B) and on
# scaled_dot_product_attention (A, QUANTBENCH_DECODE_ATTENTION=sdpa), batches 1 and 8, order B A; then batch 1 with
# a static cache of 4096 positions, B A. Carried: .gpu/wheels, .gpu/cache_xreg.tar.xz,
# .gpu/cache_bound.tar.xz.
set -o pipefail
OUT_FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT  # one archive comes back (the count of files is limited)
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
one() {  # name, attention kernel, batches, more arguments
  local left=$(( 570 - $(date +%s) + start ))
  [ $left -lt 60 ] && { stamp "$1 skipped"; return; }
  QUANTBENCH_DECODE_ATTENTION=$2 timeout $left python3 bench/kernel_speed.py --device cuda --skip-matmul \
    --engines cuda,mma --size 8b --prompt 1 --decode-batches $3 --only-fused --compile --head --pdl \
    --variants int4-g128 ${@:4} --json $OUT/$1.json 2>&1 | grep -v -i warn > $OUT/$1.log
  stamp "$1 rc $?"
  grep "^decode" $OUT/$1.log | sed "s/^/$1: /" | sed 's/(8b.*cache [0-9]*)//'
}
one B2_split split "1 8"
one A2_sdpa sdpa "1 8"
one B2_split_4096 split 1 --cache-length 4096
one A2_sdpa_4096 sdpa 1 --cache-length 4096
tail -5 $OUT/tests.log
tar cJf $OUT_FINAL/run2.tar.xz -C $OUT .
