#!/bin/bash
# The gated MLP's activation stored by the matmul's kernel (fused.GatedMLP): GPU tests (the gated kernels, a gated
# Llama against the unfused one, the CUDA kernels' own int4 tests as before), then 8B decode at batches 1 and 8:
# fp16, each variant gated, each ungated (gate and up fused siblings, the activation a kernel of its own), in one
# process. Usage: run.sh TESTS (1 to run them) VARIANT... Carried: .gpu/wheels, .gpu/cache_gated.tar.xz (the
# libraries of this packed_gemv.cu / packed_mma.cu, built by cuda_build --arch 90).
# As run, at 2f3c6e6, where the gated MLPs were the default and --ungated decoded gate and up as siblings (labels
# "VARIANT" gated, "VARIANT ungated" not): run1/ `run.sh 1 int4-g128 ternary2`, run2/ `LIMIT=215 run.sh 0
# ternary2` on the same warm H100. Since, the gated MLPs are opt-in and the flag is --gated.
set -o pipefail
OUT_FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT  # one archive comes back (the count of files is limited)
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench QUANTBENCH_KERNEL_ENGINES=cuda,mma
mkdir -p /tmp/cc && tar xJf .gpu/cache_gated.tar.xz -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
tests=$1; shift
if [ "$tests" = 1 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gated_mlp.py 2>&1 | tail -15 > $OUT/tests.log
  stamp "gated tests rc $?"
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "(cuda_decode_kernel_equals or tensor_core_kernel_equals) and int4" 2>&1 | tail -15 > $OUT/tests_kernels.log
  stamp "kernel tests rc $?"
  tail -2 $OUT/tests.log $OUT/tests_kernels.log
fi
left=$(( ${LIMIT:-395} - $(date +%s) + start ))  # LIMIT: seconds for the whole call
timeout $left python3 bench/kernel_speed.py --device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 1 \
  --decode-batches 1 8 --only-fused --compile --head --pdl --variants "$@" --ungated \
  --json $OUT/decode.json 2>&1 | grep -v -i warn > $OUT/decode.log
stamp "decode rc $?"
grep "^decode" $OUT/decode.log | sed 's/(8b.*cache [0-9]*)//'
tar cJf $OUT_FINAL/gated.tar.xz -C $OUT .
