#!/bin/bash
# A/B of x held through registers in the cp.async tiles (B, the working tree) against x by cp.async (A,
# eecdcea's packed_gemv.cu, whose libraries are in cache_async): GPU tests at B, the cp.async tiles with x held
# at four shapes alternated A/B twice, the register tiles once, the batch-1 table at B. Carried: .gpu/wheels,
# .gpu/cache_async.tar.xz (A's libraries), .gpu/cache_xreg.tar.xz (B's: gemv-0-4-1-0-8 gemv-0-4-1-1-8
# gemv-1-4-0-0-8 gemv-2-4-0-0-4 gemv-3-4-0-0-2 gemv-0-4-1-0-4 gemv-0-4-1-1-4 gemv-0-4-0-0-4 gemv-0-2-1-0-4
# gemv-0-8-1-0-8 gemv-0-8-1-1-8 built by cuda_build --arch 90) and .gpu/ab/gemv_staged.cu
# (`git show eecdcea:quantbench/export/kernels/packed_gemv.cu`).
set -o pipefail
start=$(date +%s)
W=/tmp/xreg; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_async.tar.xz -C /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
cu=quantbench/export/kernels/packed_gemv.cu
cp $cu /tmp/gemv_B.cu
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda_decode_kernel_equals > $W/tests.log 2>&1
stamp "tests rc $?"
one() {  # version tiles shape variant round
  cp docs/data/kernels-h100/x-registers/tiles_$2.json $W/t.json
  QUANTBENCH_KERNEL_TILES=$W/t.json timeout 40 python3 bench/kernel_profile.py --shape $3 --batches 1 \
    --variants "$4" 2>&1 | grep "batch 1" | sed "s/^/$1 $2 $3 round $5: /" | tee -a $W/timing.log
}
for round in 1 2; do
  for v in A B; do
    if [ $v = A ]; then cp .gpu/ab/gemv_staged.cu $cu; else cp /tmp/gemv_B.cu $cu; fi
    for shape in 14336x4096 4096x14336 8192x8192; do one $v async_held $shape int4-g128 $round; done
    one $v async_held 4096x4096 "int4-g128 act_order" $round
  done
done
cp /tmp/gemv_B.cu $cu
for shape in 14336x4096 4096x14336 8192x8192; do one B registers $shape int4-g128 1; done
one B registers 4096x4096 "int4-g128 act_order" 1
stamp timed
timeout 200 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4 --json $W/matmul_b1.json > $W/matmul_b1.log 2>&1
stamp "table rc $?"
tar cJf $OUT/xreg.tar.xz -C $W .
tail -3 $W/tests.log; cat $W/timing.log $W/times.log; tail -5 $W/matmul_b1.log
