#!/bin/bash
# usage: bash .gpu/scripts/profile_tuned.sh — batch-1 CUDA-core tiles tuned by the graph timer (outside the
# profiler), then profiled by ncu (full set, SASS-level stall samples) on those same tiles; all in $OUT/profile.tar.xz
set -o pipefail
start=$(date +%s)
W=/tmp/prof; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc && tar xJf .gpu/cache_lookahead.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc QUANTBENCH_KERNEL_TILES=$W/tiles.json
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
for spec in "14336x4096|int4-g128|down" "4096x14336|int4-g128|up" "8192x8192|int4-g128|square" "4096x4096|int4-g128 act_order|o_act" "4096x4096|int4-g128|o"; do
  IFS='|' read shape variant name <<< "$spec"
  timeout 60 python3 bench/kernel_profile.py --shape $shape --batches 1 --variants "$variant" > $W/tune_$name.log 2>&1
  stamp "tuned $name rc $?"
  timeout 60 ncu --clock-control none --profile-from-start off --set full --import-source no \
    --kernel-name regex:packed_gemv -f -o $W/prof_$name python3 bench/kernel_profile.py --shape $shape --batches 1 \
    --variants "$variant" > $W/prof_$name.log 2>&1
  stamp "profile $name rc $?"
  ncu -i $W/prof_$name.ncu-rep --page details > $W/prof_$name.txt 2>&1
  ncu -i $W/prof_$name.ncu-rep --page source --csv --print-source sass > $W/prof_${name}_sass.csv 2>&1
  rm -f $W/prof_$name.ncu-rep
  stamp "export $name rc $?"
done
tar cJf $OUT/profile.tar.xz -C $W .
cat $W/times.log; grep -h "batch 1" $W/tune_*.log
