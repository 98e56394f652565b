#!/bin/bash
# cp.async tiles with two stages beside the thread count's default (5ec4a8c, taken out in the next commit; 2026-12-06;
# docs/performance.md, "Two cp.async stages"). Libraries built on the CPU machine (QUANTBENCH_CUDA_CACHE=DIR python -m
# quantbench.export.kernels.cuda_build --arch 90 --jobs 2 --only gemv-0-4-1-0-8 gemv-0-4-1-1-8 gemv-1-4-0-0-8
# gemv-2-4-0-0-4 gemv-3-4-0-0-2 gemv-0-4-1-0-4 gemv-0-4-1-1-4 gemv-0-4-0-0-4 gemv-0-2-1-0-4 gemv-0-8-1-0-8
# gemv-0-8-1-1-8), packed as .gpu/cache_two.tar.xz; carried with .gpu/wheels and .gpu/cache_bound.tar.xz.
# Writes under $OUT as it goes: the GPU tests of the CUDA-core tiles, every batch-1 tile of int4 timed with
# registers, cp.async at the default stages and at two (gemv_anatomy), and the batch-1 table.
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda
mkdir -p /tmp/cc && tar xJf .gpu/cache_two.tar.xz -C /tmp/cc && tar xJf .gpu/cache_bound.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "cuda_decode_kernel or two_cp_async or dependent_launch or column_blocks or split_k" > $OUT/tests.log 2>&1
stamp "tests rc $?"
timeout 300 python3 bench/gemv_anatomy.py --shapes 14336x4096 4096x14336 8192x8192 4096x4096 --variants int4-g128 \
  --loads registers cp.async cp.async-2 --json $OUT/anatomy.json > $OUT/anatomy.log 2>&1
stamp "anatomy rc $?"
timeout 200 python3 bench/kernel_speed.py --device cuda --repeat 10 --skip-decode --engines cuda --batches 1 \
  --variants "int4-g128 act_order" int4-g128 ternary2 mxfp4 nvfp4 --json $OUT/matmul_b1.json \
  --tiles $OUT/tiles_b1.json > $OUT/matmul_b1.log 2>&1
stamp "table rc $?"
tail -2 $OUT/tests.log; grep "fastest" $OUT/anatomy.log; tail -5 $OUT/matmul_b1.log
python3 - <<'PY'
import json, os
rows = json.load(open(os.environ["OUT"] + "/anatomy.json"))
for shape in dict.fromkeys(r["shape"] for r in rows):
    best = {l: min((r for r in rows if r["shape"] == shape and r["loads"] == l), key=lambda r: r["us"])
            for l in dict.fromkeys(r["loads"] for r in rows)}
    print(shape, " | ".join(f"{l} {b['us']:.1f} ({b['threads']} thr, {b['lanes']} lanes, split {b['splits']}, "
                            f"cb {b['column_blocks']}, x {'sh' if b['x_in_shared'] else 'mem'})" for l, b in best.items()))
PY
grep -o '"num_stages": [0-9]' $OUT/tiles_b1.json | sort | uniq -c
