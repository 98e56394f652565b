#!/bin/bash
# usage: bash .gpu/scripts/run3.sh (carry .gpu/base2: git archive a5174ac quantbench bench) — the operator's host
# time a call and the compiled 8B decode without CUDA graphs, a5174ac ("base") and the current code alternated
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1
mkdir -p /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc && tar xJf .gpu/cache_lookahead.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
for code in base current; do
  root=.; [ $code = base ] && root=.gpu/base2
  PYTHONPATH=/tmp/site:$root:$root/bench QUANTBENCH_KERNEL_ENGINES=cuda timeout 40 python3 $root/bench/launch_overhead.py \
    --operator --calls 1000 --repeat 3 --variants "int4-g128 act_order" int4-g128 2>&1 | grep -v -i warn \
    | tee -a $OUT/launch_operator_$code.log
  stamp "operator $code rc $?"
done
for code in current base; do
  root=.; [ $code = base ] && root=.gpu/base2
  PYTHONPATH=/tmp/site:$root:$root/bench timeout 80 python3 $root/bench/kernel_speed.py --device cuda --skip-matmul \
    --engines cuda,mma --size 8b --prompt 1 --new-tokens 64 --decode-batches 1 --only-fused --compile \
    --variants int4-g128 --json $OUT/compiled_$code.json 2>&1 | grep -v -i warn | tail -4 | tee $OUT/compiled_$code.log
  stamp "compiled $code rc $?"
done
