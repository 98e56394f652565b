#!/bin/bash
# usage: bash .gpu/scripts/profile_async.sh — the batch-1 register tiles of profile_tuned.sh against the same tiles with
# cp.async stages (graph timer, alternated, twice), then ncu of the cp.async ones; all in $OUT/async.tar.xz
set -o pipefail
start=$(date +%s)
W=/tmp/async; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc && tar xJf .gpu/cache_lookahead.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
for round in 1 2; do
  for k in registers async; do
    for shape in 8192x8192 14336x4096; do
      cp .gpu/scripts/tiles_$k.json $W/t.json
      QUANTBENCH_KERNEL_TILES=$W/t.json timeout 40 python3 bench/kernel_profile.py --shape $shape --batches 1 \
        --variants int4-g128 2>&1 | grep "batch 1" | sed "s/^/$k $shape round $round: /" | tee -a $W/timing.log
    done
  done
done
stamp timed
for spec in "8192x8192|square" "14336x4096|down"; do
  IFS='|' read shape name <<< "$spec"
  cp .gpu/scripts/tiles_async.json $W/t.json
  QUANTBENCH_KERNEL_TILES=$W/t.json timeout 50 ncu --clock-control none --profile-from-start off --set full \
    --import-source no --kernel-name regex:packed_gemv -f -o $W/prof_$name python3 bench/kernel_profile.py \
    --shape $shape --batches 1 --variants int4-g128 > $W/prof_$name.log 2>&1
  ncu -i $W/prof_$name.ncu-rep --page details > $W/prof_$name.txt 2>&1
  ncu -i $W/prof_$name.ncu-rep --page source --csv --print-source sass > $W/prof_${name}_sass.csv 2>&1
  rm -f $W/prof_$name.ncu-rep
  stamp "profile $name"
done
tar cJf $OUT/async.tar.xz -C $W .
cat $W/timing.log $W/times.log
