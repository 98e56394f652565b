#!/bin/bash
# The commands of this directory's figures, run on a warm H100 after ../lookahead/run.sh had set up /tmp/site (the
# wheels) and /tmp/cc (the libraries); .gpu/base = `git archive 389307b quantbench bench` with the current
# bench/launch_overhead.py copied in. The current code was 949040d (the lookahead, taken out after, does not
# touch these paths).
export QUANTBENCH_CUDA_CACHE=/tmp/cc
for mode in "" --operator; do
  for code in base current; do
    root=.; [ $code = base ] && root=.gpu/base
    PYTHONPATH=/tmp/site:$root:$root/bench QUANTBENCH_KERNEL_ENGINES=cuda timeout 45 python3 $root/bench/launch_overhead.py \
      $mode --calls 1000 --repeat 3 --variants "int4-g128 act_order" int4-g128 nvfp4 2>&1 | grep -v -i warn \
      | tee -a $OUT/launch${mode}_$code.log
  done
done
for code in current base; do
  root=.; [ $code = base ] && root=.gpu/base
  PYTHONPATH=/tmp/site:$root:$root/bench timeout 190 python3 $root/bench/kernel_speed.py --device cuda --skip-matmul \
    --engines cuda,mma --size 8b --prompt 1 --new-tokens 64 --decode-batches 1 --only-fused --compile \
    --variants int4-g128 --json $OUT/compiled_$code.json 2>&1 | grep -v -i warn | tail -15 | tee $OUT/compiled_$code.log
done
