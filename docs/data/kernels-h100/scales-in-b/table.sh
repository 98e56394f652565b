#!/bin/bash
# The tensor-core range of the table at this code (scales in B below 64 rows offered, split-K's new
# adding): batches 64, 32, 16 and 8, engines cuda and mma, five kinds, four shapes, against fp16 and tinygemm in
# the same run. Carried: .gpu/wheels, .gpu/cache_final.tar.xz. Usage: [SHAPES="4096x4096 …"] [BATCHES="64 32"]
# table.sh [LIMIT seconds, default 450]
. docs/data/kernels-h100/call_setup.sh /tmp/t cache_final.tar.xz
timeout $(( ${1:-450} - $(date +%s) + start )) python3 bench/kernel_speed.py --device cuda --repeat 10 \
  --skip-decode --engines cuda,mma --batches ${BATCHES:-64 32 16 8} \
  ${SHAPES:+--shapes $SHAPES} --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 \
  nvfp4 --json $OUT/table.json 2>&1 | grep -v -i warn > $OUT/table.log
stamp "table rc $?"
cat $OUT/table.log
tar cJf $OUT_FINAL/table.tar.xz -C $OUT .
