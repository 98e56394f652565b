#!/bin/bash
# Tuned tiles persisting across processes: a random 1B int4-g128 checkpoint (SmolLM2's tokenizer copied in), then
# `quantbench generate` twice, each a new process: the first tunes every tile and saves them in the tiles cache,
# the second reads them. Carried: .gpu/wheels, .gpu/cache_final.tar.xz, .gpu/tok.
. docs/data/kernels-h100/call_setup.sh /tmp/tiles cache_final.tar.xz
export QUANTBENCH_TILES_CACHE=$OUT/tiles
python3 -c "
import sys, torch; sys.path.insert(0, 'bench')
from random_models import write_random_checkpoint
write_random_checkpoint('/tmp/ckpt1b', '1b', 'int4-g128-gptq', torch.float16, torch.device('cuda'))"
cp .gpu/tok/* /tmp/ckpt1b; stamp "written"
for run in first second; do
  timeout 170 python3 -m quantbench generate /tmp/ckpt1b -p "The capital of France is" -n 64 --json \
    > $OUT/$run.json 2> $OUT/$run.err; stamp "$run rc $?"
  python3 -c "import json; print({k: v for k, v in json.load(open('$OUT/$run.json')).items() if k != 'text'})"
done
ls -la $OUT/tiles > $OUT/tiles.txt
tar cJf $OUT_FINAL/tiles.tar.xz -C $OUT .
cat $OUT/tiles.txt
