#!/bin/bash
# A/B of x staged with the slabs in the cp.async tiles that do not hold x (B, the working tree) against x read
# from memory a round at a time (A, 91c55ef's packed_gemv.cu, libraries in cache_xreg): GPU tests at B, the
# cp.async tiles without x held at four int4 shapes alternated A/B twice, then at B the same tiles with x held and
# the register tiles, once each; the batch-1 table at B. Run 2026-12-06 on an H100 with B = 97947ff (taken out
# again in 7ff5d6b). Carried: .gpu/wheels, .gpu/cache_xreg.tar.xz (A's libraries, as in ../x-registers),
# .gpu/cache_xst.tar.xz (B's: the same weight types and gemv-0-8-0-0-8, gemv-0-2-1-0-8),
# .gpu/cache_bound.tar.xz (the tensor-core libraries of the dependent-launch tests) and .gpu/ab/gemv_xreg.cu
# (`git show 91c55ef:quantbench/export/kernels/packed_gemv.cu`).
set -o pipefail
start=$(date +%s)
W=/tmp/xstaged; mkdir -p $W
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $W/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc && tar xJf .gpu/cache_xst.tar.xz -C /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $W/gpu.txt
cu=quantbench/export/kernels/packed_gemv.cu
cp $cu /tmp/gemv_B.cu
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_decode_kernel or dependent_launch" \
  > $W/tests.log 2>&1
stamp "tests rc $?"
one() {  # version tiles shape round
  cp docs/data/kernels-h100/x-staged/tiles_$2.json $W/t.json
  QUANTBENCH_KERNEL_TILES=$W/t.json timeout 40 python3 bench/kernel_profile.py --shape $3 --batches 1 \
    --variants int4-g128 2>&1 | grep "batch 1" | sed "s/^/$1 $2 $3 round $4: /" | tee -a $W/timing.log
}
shapes="14336x4096 4096x14336 8192x8192 4096x4096"
for round in 1 2; do
  for v in A B; do
    if [ $v = A ]; then cp .gpu/ab/gemv_xreg.cu $cu; else cp /tmp/gemv_B.cu $cu; fi
    for shape in $shapes; do one $v async_staged $shape $round; done
  done
done
cp /tmp/gemv_B.cu $cu
for k in async_held registers; do for shape in $shapes; do one B $k $shape 1; done; done
stamp timed
timeout 200 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4 --json $W/matmul_b1.json --tiles $W/tiles_b1.json \
  > $W/matmul_b1.log 2>&1
stamp "table rc $?"
tar cJf $OUT/xstaged.tar.xz -C $W .
tail -3 $W/tests.log; grep -v "fp16 batch" $W/timing.log | sed 's/, TileConfig.*//'; cat $W/times.log; tail -5 $W/matmul_b1.log
