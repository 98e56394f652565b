#!/bin/bash
# The register tiles with two slabs in registers, each reloaded two rounds ahead (4b894e9, taken out in 5af2d29
# until a GPU has run it; written 2026-12-06, see docs/performance.md, "act_order folded into gate and up; where a
# batch-1 tile's warps wait"). To run it:
#   git show 5af2d29:quantbench/export/kernels/packed_gemv.cu > .gpu/ab/gemv_head.cu   # A, one slab ahead
#   git revert 5af2d29                                                                  # B, the working tree
#   A's libraries (91c55ef's source, the same as 5af2d29's) and B's, each built on the CPU machine by
#   QUANTBENCH_CUDA_CACHE=DIR python -m quantbench.export.kernels.cuda_build --arch 90 --jobs 2 --only
#   gemv-0-4-1-0-8 gemv-0-4-1-1-8 gemv-1-4-0-0-8 gemv-2-4-0-0-4 gemv-3-4-0-0-2 gemv-0-4-1-0-4 gemv-0-4-1-1-4
#   gemv-0-4-0-0-4 gemv-0-2-1-0-4 gemv-0-8-1-0-8 gemv-0-8-1-1-8 (A's only needs gemv-0-4-1-0-8), packed as
#   .gpu/cache_xreg.tar.xz (A) and .gpu/cache_ahead.tar.xz (B); carry them with .gpu/wheels, .gpu/ab and
#   .gpu/cache_bound.tar.xz (the tensor-core libraries, built alike with --only mma-…), then on the GPU:
#   bash docs/data/kernels-h100/ahead/run.sh
# Writes under $OUT as it goes: the GPU tests of the CUDA-core tiles at B, the tuned register tiles of
# tiles_registers.json at four int4 shapes, A and B alternated (ABBA), and the batch-1 table at B.
set -o pipefail
here=docs/data/kernels-h100/ahead
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_xreg.tar.xz -C /tmp/cc && tar xJf .gpu/cache_ahead.tar.xz -C /tmp/cc
[ -f .gpu/cache_bound.tar.xz ] && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc  # the dependent-launch tests' mma
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
cu=quantbench/export/kernels/packed_gemv.cu
cp $cu /tmp/gemv_B.cu
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_decode_kernel or dependent_launch" \
  > $OUT/tests.log 2>&1
echo "tests rc $?" >> $OUT/tests.log
one() {  # version shape round
  cp $here/tiles_registers.json /tmp/t.json
  QUANTBENCH_KERNEL_TILES=/tmp/t.json timeout 40 python3 bench/kernel_profile.py --shape $2 --batches 1 \
    --variants int4-g128 2>&1 | grep "batch 1" | sed "s/^/$1 $2 round $3: /" | tee -a $OUT/timing.log
}
for round in 1 2; do
  for v in $([ $round = 1 ] && echo A B || echo B A); do
    if [ $v = A ]; then cp .gpu/ab/gemv_head.cu $cu; else cp /tmp/gemv_B.cu $cu; fi
    for shape in 14336x4096 4096x14336 8192x8192 4096x4096; do one $v $shape $round; done
  done
done
cp /tmp/gemv_B.cu $cu
timeout 200 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4 --json $OUT/matmul_b1.json \
  --tiles $OUT/tiles_b1.json > $OUT/matmul_b1.log 2>&1
tail -3 $OUT/tests.log; grep -v "fp16 batch" $OUT/timing.log | sed 's/, TileConfig.*//'; tail -5 $OUT/matmul_b1.log
