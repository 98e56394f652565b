#!/bin/bash
# The generate and sampling tests on a GPU: greedy, sampled and rows taken in turn (greedy and sampled) in the CUDA
# graph against eager (the tiny checkpoint's int4-g32 and int8 libraries built there by nvcc), the keyed draws'
# hashes on CUDA against their references, and the decode attention's GPU cases (padded rows' masks through the
# split kernel), the sampling kernels against torch's draws; then what a sampled token's draw costs in a CUDA graph
# (bench/draw_noise.py: torch's operators against the Triton kernels). Carried: .gpu/wheels, .gpu/cache_final.tar.xz.
. docs/data/kernels-h100/call_setup.sh /tmp/gen cache_final.tar.xz
export QUANTBENCH_TILES_CACHE=/tmp/tiles
timeout 420 python3 -m pytest -q -p no:cacheprovider -x tests/test_generate.py tests/test_sampling.py \
  tests/test_decode_attention.py tests/test_split_attention.py \
  2>&1 | grep -v -E "Warning|warn_once" | tail -40 > $OUT/tests.log
stamp "tests rc $?"
timeout 240 python3 bench/draw_noise.py --device cuda --repeat 100 > $OUT/draw-noise.log 2>&1
stamp "draw noise rc $?"
tar cJf $OUT_FINAL/gpu-tests.tar.xz -C $OUT .
cat $OUT/gpu.txt $OUT/tests.log $OUT/draw-noise.log $OUT/times.log
