#!/bin/bash
# The GPTQ solve on CUDA after the column loop's change (eager, CUDA graphs and the fused kernel, codes compared;
# bench/gptq_solve.py), and tests/test_gptq_speed.py, whose Triton kernels run on CPU tensors: through Triton's
# interpreter, as on the CPU machine (run.sh ran them without it, where they cannot launch). Carried: .gpu/wheels,
# .gpu/cache_final.tar.xz.
. docs/data/kernels-h100/call_setup.sh /tmp/hessian cache_final.tar.xz
cp $OUT/gpu.txt $OUT_FINAL/
timeout 200 python3 bench/gptq_solve.py --layers o down --schemes int4-g128-gptq int4-g128-gptq-act int3-g128-gptq \
  mxfp4-gptq --repeat 3 > $OUT_FINAL/gptq_solve.log 2>&1
stamp "gptq_solve rc $?"
TRITON_INTERPRET=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gptq_speed.py \
  2>&1 | grep -v -E "Warning|warn_once" | tail -5 > $OUT_FINAL/tests_interpreted.log
stamp "tests rc $?"
cp $OUT/times.log $OUT_FINAL/
cat $OUT_FINAL/tests_interpreted.log $OUT_FINAL/gptq_solve.log | tail -30
