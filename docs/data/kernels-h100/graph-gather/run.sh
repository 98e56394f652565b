#!/bin/bash
# The GPU call of docs/performance.md's "act_order gathered in the compiled graph (not kept)", run at 9726dd5 from
# the repository root: bash run.sh CACHE.tar.xz. Compiled 8B decode with act_order gathered in the graph (that tree)
# against gathered in the kernels (.gpu/ab/modules_before.py: quantbench/export/kernels/modules.py at 41f18f3),
# same tiles, fp16 in each run. It carried CACHE.tar.xz (the 31 tensor-core libraries and gemv-0-4-1-1-8,
# gemv-0-4-1-0-8 built with cuda_build.py), .gpu/wheels (docs/development.md), .gpu/ab and this script.
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:.:bench PYTHONUNBUFFERED=1
mkdir -p /tmp/cc && tar xJf $1 -C /tmp/cc && export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> $OUT/gpu.txt
stamp setup
D=(--device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 1 --decode-batches 1 8 --only-fused --compile
   --head --pdl --tiles /tmp/tiles.json)
timeout 200 python3 bench/kernel_speed.py "${D[@]}" --variants "int4-g128 act_order" int4-g128 \
  --json $OUT/after.json 2>&1 | grep -v -i warn | tee $OUT/after.log
stamp "after rc $?"
cp quantbench/export/kernels/modules.py /tmp/modules_after.py && cp .gpu/ab/modules_before.py quantbench/export/kernels/modules.py
timeout 150 python3 bench/kernel_speed.py "${D[@]}" --variants "int4-g128 act_order" \
  --json $OUT/before.json 2>&1 | grep -v -i warn | tee $OUT/before.log
stamp "before rc $?"
cp /tmp/modules_after.py quantbench/export/kernels/modules.py
QUANTBENCH_KERNEL_ENGINES=cuda,mma QUANTBENCH_KERNEL_TILES=/tmp/tiles.json \
  timeout 170 python3 bench/decode_profile.py --size 8b --compile --no-floor --variants "int4-g128 act_order" \
  int4-g128 --json $OUT/profile.json 2>&1 | grep -v -i warn | tee $OUT/profile.log
stamp "profile rc $?"
