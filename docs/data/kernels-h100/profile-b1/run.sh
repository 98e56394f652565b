#!/bin/bash
# usage: bash .gpu/scripts/profile_b1.sh — SASS-level stall profile of the batch-1 CUDA-core tiles (ncu, full set),
# then the GPU tests of the bound calls and both operators
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc && tar xJf .gpu/cache_lookahead.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
which ncu >> $OUT/gpu.txt; ncu --version >> $OUT/gpu.txt 2>&1
stamp setup
for spec in "14336x4096|int4-g128|down" "8192x8192|int4-g128|square" "4096x4096|int4-g128 act_order|o_act"; do
  IFS='|' read shape variant name <<< "$spec"
  timeout 150 ncu --clock-control none --profile-from-start off --set full --import-source no \
    --kernel-name regex:packed_gemv -f -o $OUT/prof_$name python3 bench/kernel_profile.py --shape $shape --batches 1 \
    --variants "$variant" > $OUT/prof_$name.log 2>&1
  stamp "profile $name rc $?"
  ncu -i $OUT/prof_$name.ncu-rep --page details > $OUT/prof_$name.txt 2>&1
  ncu -i $OUT/prof_$name.ncu-rep --page source --csv --print-source sass > $OUT/prof_${name}_sass.csv 2>&1
  stamp "export $name rc $?"
done
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "bound or operator" > $OUT/tests.log 2>&1
stamp "tests rc $?"
tail -3 $OUT/tests.log
cat $OUT/times.log
