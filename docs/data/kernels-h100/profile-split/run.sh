#!/bin/bash
# The split-cache attention's GPU tests (with a Llama's static-cache decode), then where an 8B decode step's time
# goes with it at batch 1 (the setting of profile-step/: lm_head packed, dependent launch, cache of 73 positions).
# Carried: .gpu/wheels, .gpu/cache_xreg.tar.xz, .gpu/cache_bound.tar.xz.
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda,mma
mkdir -p /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_split_attention.py 2>&1 | tail -4 > $OUT/tests.log
stamp "tests rc $?"
timeout $(( 290 - $(date +%s) + start )) python3 bench/decode_profile.py --size 8b --compile --head --pdl \
  --variants int4-g128 --batch 1 --json $OUT/b1.json 2>&1 | grep -v -i warn > $OUT/b1.log
stamp "b1 rc $?"
cat $OUT/tests.log; grep -A7 "^fp16\|^int4\|^no matmul" $OUT/b1.log | grep -v "^ *[0-9.]* µs .*×"
