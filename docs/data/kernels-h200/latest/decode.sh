#!/bin/bash
# 8B decode at batches 1 and 8 from written checkpoints (int4 act_order, int4, ternary2), against fp16 in the same
# run, on the decode attention split over the cache (the GPU default; --attention sdpa for transformers' own).
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz (the libraries of the code since bfe895f).
. docs/data/kernels-h100/call_setup.sh /tmp/decode cache_final.tar.xz
timeout 570 python3 bench/kernel_speed.py --device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 1 \
  --decode-batches 1 8 --only-fused --compile --head --pdl --from-checkpoint /tmp/ckpts \
  --variants "int4-g128 act_order" int4-g128 ternary2 --json $OUT/decode.json 2>&1 | grep -v -i warn > $OUT/decode.log
stamp "decode rc $?"
tar cJf $OUT_FINAL/decode.tar.xz -C $OUT .
grep -E "decode|loaded" $OUT/decode.log; cat $OUT/times.log
