#!/bin/bash
# A first use of `quantbench generate` with Triton's tiles among the candidates and without: a random 8B
# int4-g128 checkpoint (SmolLM2's tokenizer copied in), generated in new processes, each with an empty tiles
# cache: engines cuda,mma, then the default (triton,cuda,mma), then the default again reading its saved tiles.
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz, .gpu/tok.
. docs/data/kernels-h100/call_setup.sh /tmp/first-use cache_final.tar.xz
export TRITON_CACHE_DIR=/tmp/triton-first-use
python3 -c "
import sys, torch; sys.path.insert(0, 'bench')
from random_models import write_random_checkpoint
write_random_checkpoint('/tmp/ckpt8b', '8b', 'int4-g128-gptq', torch.float16, torch.device('cuda'), head=True)"
cp .gpu/tok/* /tmp/ckpt8b; stamp "written"
generate() {  # LABEL ENGINES TILES
  QUANTBENCH_KERNEL_ENGINES=$2 QUANTBENCH_TILES_CACHE=$OUT/$3 timeout 170 python3 -m quantbench generate /tmp/ckpt8b \
    -p "The capital of France is" -n 128 --json > $OUT/$1.json 2> $OUT/$1.err
  stamp "$1 rc $?"
  python3 -c "import json; print('$1', {k: v for k, v in json.load(open('$OUT/$1.json')).items() if k != 'text'})"
}
generate cuda-mma cuda,mma tiles-cuda-mma
generate default triton,cuda,mma tiles-default
generate default-again triton,cuda,mma tiles-default
tar cJf $OUT_FINAL/first-use.tar.xz -C $OUT .
cat $OUT/times.log
