#!/bin/bash
# 8B decode from written checkpoints on the H200, for the code it runs from (packed_gemv.cu as at 91c55ef; every
# model on the decode attention since d5f4fe4, the benches' default, split over the cache on the GPU since 0bbd9a5;
# add --attention sdpa for transformers' own, QUANTBENCH_DECODE_ATTENTION=sdpa for the grouped attention unsplit).
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz (the CUDA-core and tensor-core libraries of the code since
# bfe895f: split-K's new adding in packed_mma.cu).
# 8B decode at batches 1 and 8 from written checkpoints (int4 act_order, int4, ternary2), against fp16 in the same run.
set -o pipefail
start=$(date +%s)
W=/tmp/decode; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/cache_final.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
timeout 570 python3 bench/kernel_speed.py --device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 1 \
  --decode-batches 1 8 --only-fused --compile --head --pdl --from-checkpoint /tmp/ckpts \
  --variants "int4-g128 act_order" int4-g128 ternary2 --json $W/decode.json 2>&1 | grep -v -i warn > $W/decode.log
stamp "decode rc $?"
tar cJf $OUT/decode.tar.xz -C $W .
grep -E "decode|loaded" $W/decode.log; cat $W/times.log
