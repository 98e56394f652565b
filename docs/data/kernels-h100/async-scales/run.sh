#!/bin/bash
# The cp.async tiles of the CUDA-core kernel with each slab's scale groups copied beside its words (written
# 2026-12-06, run the same day on an H100 at fb19f41; see docs/performance.md, "act_order folded into gate and up;
# where a batch-1 tile's warps wait"). As it was run: `git revert` the commit that took the change out, build the
# libraries
# (QUANTBENCH_CUDA_CACHE=DIR python -m quantbench.export.kernels.cuda_build --arch 90 --only gemv-0-4-1-0-8
# gemv-0-4-1-1-8 gemv-1-4-0-0-8 gemv-2-4-0-0-4 gemv-3-4-0-0-2 gemv-0-4-1-0-4 gemv-0-4-1-1-4 gemv-0-4-0-0-4
# gemv-0-2-1-0-4 gemv-0-8-1-0-8 gemv-0-8-1-1-8: the benchmark's and the partial-tile test's), carry them as
# .gpu/cache_async.tar.xz with the wheels, then on the GPU: bash docs/data/kernels-h100/async-scales/run.sh
# Writes $OUT/async_scales.tar.xz: the GPU tests of the CUDA-core tiles, the timer's A/B of the register tiles and
# the cp.async tiles on the tiles files of this directory (alternated, twice; the cp.async tiles before the change
# took 20.5 µs at 8192² and 17.8–18.2 at 14336×4096 against 16.9–17.3 and 15.8 for the register tiles, H100),
# the batch-1 table of five kinds, and ncu of the cp.async tiles.
set -o pipefail
here=docs/data/kernels-h100/async-scales
start=$(date +%s)
W=/tmp/async_scales; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_async.tar.xz -C /tmp/cc && export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda_decode_kernel_equals > $W/tests.log 2>&1
stamp "tests rc $?"
for round in 1 2; do
  for k in registers async; do
    for shape in 8192x8192 14336x4096; do
      cp $here/tiles_$k.json $W/t.json
      QUANTBENCH_KERNEL_TILES=$W/t.json timeout 40 python3 bench/kernel_profile.py --shape $shape --batches 1 \
        --variants int4-g128 2>&1 | grep "batch 1" | sed "s/^/$k $shape round $round: /" | tee -a $W/timing.log
    done
  done
done
stamp timed
timeout 200 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4 --json $W/matmul_b1.json > $W/matmul_b1.log 2>&1
stamp "table rc $?"
for spec in "8192x8192|square" "14336x4096|down"; do
  IFS='|' read shape name <<< "$spec"
  cp $here/tiles_async.json $W/t.json
  QUANTBENCH_KERNEL_TILES=$W/t.json timeout 50 ncu --clock-control none --profile-from-start off --set full \
    --import-source no --kernel-name regex:packed_gemv -f -o $W/prof_$name python3 bench/kernel_profile.py \
    --shape $shape --batches 1 --variants int4-g128 > $W/prof_$name.log 2>&1
  ncu -i $W/prof_$name.ncu-rep --page details > $W/prof_$name.txt 2>&1
  ncu -i $W/prof_$name.ncu-rep --page source --csv --print-source sass > $W/prof_${name}_sass.csv 2>&1
  rm -f $W/prof_$name.ncu-rep
  stamp "profile $name"
done
tar cJf $OUT/async_scales.tar.xz -C $W .
tail -3 $W/tests.log; cat $W/timing.log $W/times.log
