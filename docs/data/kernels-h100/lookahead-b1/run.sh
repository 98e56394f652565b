#!/bin/bash
# The CUDA-core kernel's L2 lookahead (each thread asks L2 for its words and scales rounds ahead of its loads): GPU
# tests with the default lookahead, then the same register tiles (tiles_registers.json, tuned on an H100 on
# 2026-12-06) with no lookahead (QUANTBENCH_GEMV_LOOKAHEAD=0) and the default alternated twice, then the batch-1
# table tuned afresh both ways. Carried: .gpu/wheels, .gpu/cache_final.tar.xz (the gemv libraries of this code:
# gemv-0-4-1-0-8 gemv-0-4-1-1-8 gemv-1-4-0-0-8 gemv-2-4-0-0-4 gemv-3-4-0-0-2 gemv-0-4-1-0-4 gemv-0-4-1-1-4
# gemv-0-4-0-0-4 gemv-0-2-1-0-4 gemv-0-8-1-0-8 gemv-0-8-1-1-8).
. docs/data/kernels-h100/call_setup.sh /tmp/lookahead cache_final.tar.xz
export QUANTBENCH_KERNEL_ENGINES=cuda
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda_decode_kernel_equals \
  > $OUT/tests.log 2>&1
stamp "tests rc $?"
one() {  # lookahead shape variant round
  cp docs/data/kernels-h100/lookahead-b1/tiles_registers.json $OUT/t.json
  if [ $1 = default ]; then unset QUANTBENCH_GEMV_LOOKAHEAD; else export QUANTBENCH_GEMV_LOOKAHEAD=$1; fi
  QUANTBENCH_KERNEL_TILES=$OUT/t.json timeout 40 python3 bench/kernel_profile.py --shape $2 --batches 1 \
    --variants "$3" 2>&1 | grep "batch 1" | sed "s/^/lookahead $1 $2 round $4: /" | tee -a $OUT/timing.log
}
for round in 1 2; do
  for la in 0 default; do
    for shape in 14336x4096 4096x14336 8192x8192; do one $la $shape int4-g128 $round; done
    one $la 4096x4096 "int4-g128 act_order" $round
  done
done
stamp timed
for la in default 0; do
  if [ $la = default ]; then unset QUANTBENCH_GEMV_LOOKAHEAD; else export QUANTBENCH_GEMV_LOOKAHEAD=$la; fi
  timeout 150 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
    --variants int4-g128 mxfp4 nvfp4 "int4-g128 act_order" --json $OUT/matmul_b1_$la.json \
    > $OUT/matmul_b1_$la.log 2>&1
  stamp "table $la rc $?"
done
cp $OUT/tests.log $OUT/timing.log $OUT/times.log $OUT/matmul_b1_*.log $OUT/gpu.txt $OUT_FINAL/
tail -3 $OUT/tests.log; cat $OUT/timing.log; grep -v -i warn $OUT/matmul_b1_*.log; cat $OUT/times.log
