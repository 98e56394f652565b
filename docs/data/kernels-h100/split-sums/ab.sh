#!/bin/bash
# The split-K sums before and after store_split_sums on the same tile: bench/mma_builds.py with the libraries of
# the code before (the old build: .gpu/cache_gated.tar.xz, renamed as mma_builds asks) against this code's, the
# tuner's fastest 2-split tile of 8-row blocks at batch 8 and of 16-row blocks at batch 16; GPU tests before.
# Carried: .gpu/wheels, .gpu/cache_gated.tar.xz, .gpu/cache_final.tar.xz.
. docs/data/kernels-h100/call_setup.sh /tmp/ab cache_final.tar.xz
mkdir -p /tmp/oldraw /tmp/old && tar xJf .gpu/cache_gated.tar.xz -C /tmp/oldraw
for f in /tmp/oldraw/packed_mma-*.so; do  # packed_mma-k0-b4-z1-p0-f0-sm90-HASH.so → mma-0-4-1-0-0.so
  cp $f /tmp/old/$(basename $f | sed -E 's/packed_mma-k([0-9])-b([0-9])-z([0-9])-p([0-9])-f([0-9])-.*/mma-\1-\2-\3-\4-\5.so/')
done
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gated_mlp.py \
  -k "split or store_silu or tensor_core_kernel_equals" 2>&1 | tail -15 > $OUT/tests.log
stamp "tests rc $?"; tail -2 $OUT/tests.log
for cell in "8 8" "16 16"; do
  set -- $cell
  timeout 200 python3 bench/mma_builds.py --old /tmp/old --rows $1 --batches $2 --split-k 2 \
    --variants int4-g128 ternary2 nvfp4 --json $OUT/ab_rows$1.json 2>&1 | grep -v -i warn > $OUT/ab_rows$1.log
  stamp "rows $1 rc $?"
done
cat $OUT/ab_rows*.log
tar cJf $OUT_FINAL/ab.tar.xz -C $OUT .
