#!/bin/bash
# The table at this code: batch 1 (engine cuda), then batches 2-64 (cuda,mma), five kinds, four shapes,
# against fp16 and tinygemm in the same runs. Carried: .gpu/wheels, .gpu/cache_final.tar.xz (the CUDA-core and
# tensor-core libraries of the code since bfe895f: split-K's new adding in packed_mma.cu).
# DEADLINE (default 570): the seconds from the start by which the batches 2-64 stop, for a call with less time.
. docs/data/kernels-h100/call_setup.sh /tmp/h200 cache_final.tar.xz
V=("int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4)
timeout 150 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "${V[@]}" --json $OUT/matmul_b1.json 2>&1 | grep -v -i warn > $OUT/matmul_b1.log
stamp "b1 rc $?"
timeout $(( ${DEADLINE:-570} - $(date +%s) + start )) python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode \
  --engines cuda,mma --batches 2 4 8 16 32 64 --variants "${V[@]}" --json $OUT/matmul_b2_64.json 2>&1 \
  | grep -v -i warn > $OUT/matmul_b2_64.log
stamp "b2-64 rc $?"
tar cJf $OUT_FINAL/h200.tar.xz -C $OUT .
cat $OUT/matmul_b1.log $OUT/matmul_b2_64.log $OUT/times.log
