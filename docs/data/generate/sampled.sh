#!/bin/bash
# What sampling costs a decode end to end: a random 8B int4-g128 checkpoint (Llama 3's vocabulary of 128,256;
# SmolLM2's tokenizer copied in: the text is noise, the speed is not), then bench/sampled_decode.py: greedy and
# sampled (temperature 0.8, top-k 50, top-p 0.9) in turn in one process, with CUDA graphs, eager and compiled.
# Carried: .gpu/wheels, .gpu/cache_final.tar.xz, .gpu/tok.
. docs/data/kernels-h100/call_setup.sh /tmp/sampled cache_final.tar.xz
export QUANTBENCH_TILES_CACHE=/tmp/tiles
python3 -c "
import sys, torch; sys.path.insert(0, 'bench')
from random_models import write_random_checkpoint
write_random_checkpoint('/tmp/ckpt8b', '8b', 'int4-g128-gptq', torch.float16, torch.device('cuda'))"
cp .gpu/tok/* /tmp/ckpt8b; stamp "written"
timeout ${BENCH_S:-400} python3 bench/sampled_decode.py /tmp/ckpt8b --rounds ${ROUNDS:-5} --new-tokens 256 \
  2>&1 | grep -v -i warn | tee $OUT/sampled_decode.log
stamp "bench rc $?"
cp $OUT/sampled_decode.log $OUT/times.log $OUT_FINAL/
