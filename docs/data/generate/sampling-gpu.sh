#!/bin/bash
# The sampling kernels on a GPU: what a draw costs in a CUDA graph (bench/draw_noise.py: torch's operators against
# the kernels), then tests/test_sampling.py (the Triton kernels against torch's draws, ties, rounds)
# and test_generate.py's CUDA-graph case (greedy, top-k and top-p draws in the graph as eager). Logs written where they come
# back as they are made (a call cut short keeps them); env TESTS names other tests. Carried: .gpu/wheels,
# .gpu/cache_final.tar.xz.
. docs/data/kernels-h100/call_setup.sh /tmp/sampling cache_final.tar.xz
export QUANTBENCH_TILES_CACHE=/tmp/tiles
cp $OUT/gpu.txt $OUT_FINAL/
timeout ${BENCH_S:-150} python3 bench/draw_noise.py --device cuda --repeat 30 ${BENCH_ARGS} > $OUT_FINAL/draw-noise.log 2>&1
stamp "draw noise rc $?"
timeout ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_sampling.py \
  "tests/test_generate.py::test_cuda_graph_steps_give_the_eager_steps_tokens"} \
  2>&1 | grep -v -E "Warning|warn_once" | tail -30 > $OUT_FINAL/tests.log
stamp "tests rc $?"
cp $OUT/times.log $OUT_FINAL/
cat $OUT_FINAL/gpu.txt $OUT_FINAL/tests.log $OUT_FINAL/draw-noise.log $OUT/times.log
