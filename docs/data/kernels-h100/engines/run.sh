#!/bin/bash
# Do Triton's tiles win anywhere a CUDA engine applies, and what does timing them cost a first use? The tuner's
# candidates of the default engines (triton,cuda,mma) split by engine, each engine's fastest found as the tuner
# finds it (seconds and count of candidates kept, Triton's compiles included: its cache starts empty), then the
# winners and fp16 timed alternately. The shapes of an 8B Llama's fused decode layers (q/k/v, o, gate/up, down),
# batches 1 and 8 (a decode step, a short prompt). Carried: .gpu/wheels, .gpu/cache_final.tar.xz.
# Usage: bash run.sh [VARIANT …]
. docs/data/kernels-h100/call_setup.sh /tmp/engines cache_final.tar.xz
export TRITON_CACHE_DIR=/tmp/triton-engines
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=("int4-g128 act_order" int4-g128 ternary2 nvfp4 mxfp4)
timeout ${LIMIT:-520} python3 bench/kernel_tiles.py --family engine --engines triton,cuda,mma \
  --shapes 4096x6144 4096x4096 4096x28672 14336x4096 --batches 1 8 --variants "${variants[@]}" \
  --json $OUT/engines.json 2>&1 | grep -v -i warn > $OUT/engines.log
stamp "engines rc $?"
tar cJf $OUT_FINAL/engines.tar.xz -C $OUT .
cat $OUT/engines.log $OUT/times.log
