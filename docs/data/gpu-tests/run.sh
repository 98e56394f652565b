#!/bin/bash
# The tests a CPU machine skips for want of a GPU (their ids in .gpu/gpu_tests.txt, listed there by their skipif
# marks: `PYTHONPATH=docs/data/gpu-tests python -m pytest --co -q -p gpu_list`), run on the GPU machine: first
# the GPTQ, generation, export and split-attention ones (Triton and CUDA graphs: 10 tests, 112 s on an H100 on
# 2026-12-07, h100/first.log), then the kernels' until the call's time runs out (their CUDA libraries not in the
# carried cache are built by nvcc there, minutes each). Carried: .gpu/wheels, .gpu/cache_final.tar.xz,
# .gpu/gpu_tests.txt.
. docs/data/kernels-h100/call_setup.sh /tmp/gputests cache_final.tar.xz
cp $OUT/gpu.txt $OUT_FINAL/
cut -f1 .gpu/gpu_tests.txt > /tmp/ids.txt
grep -E "test_gptq_speed|test_generate|test_export|test_split_attention" /tmp/ids.txt > /tmp/first.txt
timeout 240 python3 docs/data/gpu-tests/ids.py /tmp/first.txt 2>&1 | grep -v -i warn \
  | tail -40 > $OUT_FINAL/first.log
stamp "first rc $?"
grep -v -x -F -f /tmp/first.txt /tmp/ids.txt > /tmp/rest.txt
timeout $(( ${DEADLINE:-560} - $(date +%s) + start )) python3 docs/data/gpu-tests/ids.py /tmp/rest.txt \
  2>&1 | grep -v -i warn | tail -60 > $OUT_FINAL/rest.log
stamp "rest rc $?"
cp $OUT/times.log $OUT_FINAL/
tail -5 $OUT_FINAL/first.log; tail -8 $OUT_FINAL/rest.log; cat $OUT_FINAL/times.log
