#!/bin/bash
# Scales in B below 64 rows, a tensor-core tile option (scales_in_b): GPU tests of the tensor-core tiles, the
# tuner's fastest tile with and without it against fp16 at batches 8, 16 and 32 (four kinds, four shapes), then
# 8B decode at batch 8 from written checkpoints with the tuner free to choose it.
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz (the libraries of this packed_gemv.cu / packed_mma.cu).
. docs/data/kernels-h100/call_setup.sh /tmp/w cache_final.tar.xz
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "tensor_core_kernel_equals" 2>&1 \
  | tail -15 > $OUT/tests.log
stamp "tests rc $?"; tail -2 $OUT/tests.log
timeout 200 python3 bench/kernel_tiles.py --engines mma --family scales_in_b --batches 8 16 32 \
  --variants ternary2 int4-g128 "int4-g128 act_order" mxfp4 --json $OUT/in_b.json 2>&1 | grep -v -i warn > $OUT/in_b.log
stamp "tiles rc $?"; cat $OUT/in_b.log
timeout $(( ${1:-570} - $(date +%s) + start )) python3 bench/kernel_speed.py --device cuda --skip-matmul \
  --engines cuda,mma --size 8b --prompt 1 --decode-batches 8 --only-fused --compile --head --pdl \
  --from-checkpoint /tmp/ckpts --variants ternary2 int4-g128 "int4-g128 act_order" --json $OUT/decode.json 2>&1 \
  | grep -v -i warn > $OUT/decode.log
stamp "decode rc $?"
grep -E "^decode" $OUT/decode.log
tar cJf $OUT_FINAL/in_b.tar.xz -C $OUT .
