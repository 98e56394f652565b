#!/bin/bash
# usage: bash .gpu/scripts/bound.sh CACHE.tar.xz — GPU tests of the bound calls, then the eager host time a packed
# call and the eager 8B decode, each with the code as of 389307b (.gpu/base) and the current code, in one run
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1
mkdir -p /tmp/cc && tar xJf $1 -C /tmp/cc && export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
stamp setup
PYTHONPATH=/tmp/site:.:bench timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "bound_cuda_calls or dependent or libraries_order or bound_kernel_call" 2>&1 | tail -5 | tee $OUT/tests.log
stamp "tests rc $?"
for code in base current; do
  root=.; [ $code = base ] && root=.gpu/base
  PYTHONPATH=/tmp/site:$root:$root/bench QUANTBENCH_KERNEL_ENGINES=cuda timeout 100 python3 $root/bench/launch_overhead.py \
    --variants "int4-g128 act_order" int4-g128 ternary2 nvfp4 2>&1 | grep -v -i warn | tee $OUT/launch_$code.log
  stamp "launch overhead $code rc $?"
done
PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda timeout 60 python3 bench/launch_overhead.py --calls 300 \
  --repeat 2 --profile --variants "int4-g128 act_order" int4-g128 2>&1 | grep -v -i warn | tee $OUT/launch_profile.log
stamp "profile rc $?"
for code in current base; do
  root=.; [ $code = base ] && root=.gpu/base
  PYTHONPATH=/tmp/site:$root:$root/bench timeout 150 python3 $root/bench/kernel_speed.py --device cuda --skip-matmul \
    --engines cuda,mma --size 8b --prompt 1 --new-tokens 64 --decode-batches 1 --variants "int4-g128 act_order" \
    int4-g128 --json $OUT/decode_$code.json 2>&1 | grep -v -i warn | tee $OUT/decode_$code.log
  stamp "decode $code rc $?"
done
