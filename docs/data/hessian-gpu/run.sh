#!/bin/bash
# This session's GPTQ and loss-Hessian changes on a GPU: the GPTQ tests (eager, CUDA graphs, the fused kernel on
# CUDA; the C++ column loop stays on the CPU), the Hessian-probe and sensitivity tests, then Hutchinson's products
# one call a probe against shared forwards (bench/hutchinson_speed.py, random weights). Carried: .gpu/wheels,
# .gpu/cache_final.tar.xz.
. docs/data/kernels-h100/call_setup.sh /tmp/hessian cache_final.tar.xz
cp $OUT/gpu.txt $OUT_FINAL/
timeout ${TESTS_S:-300} python3 -m pytest -q -p no:cacheprovider tests/test_gptq_speed.py tests/test_gptq.py \
  tests/test_gptq_cpu.py tests/test_hessian_probes.py tests/test_sensitivity.py \
  2>&1 | grep -v -E "Warning|warn_once" | tail -30 > $OUT_FINAL/tests.log
stamp "tests rc $?"
for size in smollm2-135m 1b; do
  for probes in 4 8; do
    timeout 120 python3 bench/hutchinson_speed.py --random $size --device cuda --probes $probes --samples 4 \
      --seqlen 512 2>&1 | tail -1 >> $OUT_FINAL/hutchinson.log
    stamp "hutchinson $size $probes rc $?"
  done
done
cp $OUT/times.log $OUT_FINAL/
cat $OUT_FINAL/gpu.txt $OUT_FINAL/tests.log $OUT_FINAL/hutchinson.log $OUT/times.log
