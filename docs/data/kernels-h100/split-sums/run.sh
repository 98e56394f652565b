#!/bin/bash
# Split-K's sums added with many loads in flight (store_split_sums) and split-K for 32- and 64-row tensor-core
# blocks: GPU tests of split-K (every block height, the output against the workspace's partials, gated), then
# the tuner's fastest tile of each split count against fp16 at batches 64, 32, 16 and 8, five kinds, four shapes.
# As run at 45e4111 (the taller blocks' split-K taken out since: they lost); carried: .gpu/wheels,
# .gpu/cache_split.tar.xz (that code's libraries, built by cuda_build --arch 90). Usage: run.sh [LIMIT seconds]
. docs/data/kernels-h100/call_setup.sh /tmp/w cache_split.tar.xz
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gated_mlp.py \
  -k "split or store_silu" 2>&1 | tail -15 > $OUT/tests.log
stamp "tests rc $?"; tail -3 $OUT/tests.log
left=$(( ${1:-560} - $(date +%s) + start ))
timeout $left python3 bench/kernel_tiles.py --engines mma --family split_k --batches 64 32 16 8 \
  --variants int4-g128 "int4-g128 act_order" ternary2 mxfp4 nvfp4 --json $OUT/split.json 2>&1 \
  | grep -v -i warn > $OUT/split.log
stamp "split rc $?"
cat $OUT/split.log
tar cJf $OUT_FINAL/split.tar.xz -C $OUT .
