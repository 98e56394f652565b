#!/bin/bash
# The GPU call for capped 64-row blocks and a scale per slab (docs/performance.md, "Batch 64"), run from the
# repository root with 632bef5 and cbf2600 applied: bash run.sh CACHE.tar.xz. It carries (device tool, `carry`):
#   CACHE.tar.xz  the 31 tensor-core libraries, `QUANTBENCH_CUDA_CACHE=DIR python -m
#                 quantbench.export.kernels.cuda_build --arch 90 --only mma-…` (every_weight_type()'s "mma" ones), tarred
#   .gpu/wheels   pydantic, pydantic_core, annotated-types, typing-inspection, gguf for Python 3.12 (development.md)
#   .gpu/old      mma-0-4-1-0-0.so.xz and mma-1-4-0-0-0.so.xz built from 632bef5's source (bench/mma_builds.py)
set -o pipefail
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:.:bench PYTHONUNBUFFERED=1
mkdir -p /tmp/cc && tar xJf $1 -C /tmp/cc && export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> $OUT/gpu.txt
mkdir -p /tmp/old && for f in .gpu/old/*.so.xz; do xz -dc $f > /tmp/old/$(basename $f .xz); done
stamp setup
timeout 90 python3 -m pytest -q -x tests/test_kernels.py -k "capped or tensor_core_kernel_equals" 2>&1 | tee $OUT/tests.log
stamp "tests rc $?"
V5=(int4-g128 "int4-g128 act_order" ternary2 mxfp4 nvfp4)
timeout 120 python3 bench/mma_builds.py --old /tmp/old --variants int4-g128 "int4-g128 act_order" ternary2 \
  --batches 64 --json $OUT/slab_scales.json 2>&1 | tee $OUT/slab_scales.log
stamp "slab scales rc $?"
timeout 190 python3 bench/kernel_tiles.py --engines mma --family capped --batches 64 \
  --variants "${V5[@]}" --json $OUT/capped.json 2>&1 | tee $OUT/capped.log
stamp "capped rc $?"
stamp done
