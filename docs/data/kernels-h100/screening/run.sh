#!/bin/bash
# Screening the tile candidates: the tuner timing every tile in full against each once on short graphs and the
# 8 fastest in full, over the default engines' candidates (cuda,mma), the seconds of each and both winners timed
# alternately with fp16; an 8B Llama's fused decode shapes, batches 1 and 8, five kinds. Then a first use of
# `quantbench generate` on a random 8B int4-g128 checkpoint with an empty tiles cache (screened, the default).
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz, .gpu/tok.
. docs/data/kernels-h100/call_setup.sh /tmp/screening cache_final.tar.xz
timeout ${LIMIT:-400} python3 bench/tile_screening.py --shapes 4096x6144 4096x4096 4096x28672 14336x4096 \
  --batches 1 8 --variants "int4-g128 act_order" int4-g128 ternary2 nvfp4 mxfp4 --json $OUT/screening.json 2>&1 \
  | grep -v -i warn > $OUT/screening.log
stamp "screening rc $?"
python3 -c "
import sys, torch; sys.path.insert(0, 'bench')
from random_models import write_random_checkpoint
write_random_checkpoint('/tmp/ckpt8b', '8b', 'int4-g128-gptq', torch.float16, torch.device('cuda'), head=True)"
cp .gpu/tok/* /tmp/ckpt8b; stamp "written"
QUANTBENCH_TILES_CACHE=$OUT/tiles timeout 120 python3 -m quantbench generate /tmp/ckpt8b \
  -p "The capital of France is" -n 128 --json > $OUT/generate.json 2> $OUT/generate.err
stamp "generate rc $?"
tar cJf $OUT_FINAL/screening.tar.xz -C $OUT .
cat $OUT/screening.log
python3 -c "import json; print({k: v for k, v in json.load(open('$OUT/generate.json')).items() if k != 'text'})"
cat $OUT/times.log
