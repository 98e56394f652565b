#!/bin/bash
# `quantbench generate` on a GPU: its tests (the CUDA graph steps give the eager steps' tokens), then a random
# 8B int4-g128 checkpoint decoded by the command (a tokenizer copied in: the text is noise, the speed is not),
# eager-graph and compiled, against bench/kernel_speed.py's fp16 and int4 decode (compiled, CUDA graphs) in the
# same call. Carried: .gpu/wheels, .gpu/cache_final.tar.xz, .gpu/tok (SmolLM2's tokenizer files).
. docs/data/kernels-h100/call_setup.sh /tmp/generate cache_final.tar.xz
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_generate.py 2>&1 | tail -5 > $OUT/tests.log
stamp "tests rc $?"
timeout 240 python3 bench/kernel_speed.py --device cuda --skip-matmul --engines cuda,mma --size 8b --prompt 8 \
  --new-tokens 256 --decode-batches 1 --only-fused --compile --head --pdl --from-checkpoint /tmp/ckpts \
  --variants int4-g128 --json $OUT/bench.json 2>&1 | grep -v -i warn > $OUT/bench.log
stamp "bench rc $?"
checkpoint=$(ls -d /tmp/ckpts/*/ | head -1); cp .gpu/tok/* $checkpoint
for flags in "" "--compile"; do
  timeout 150 python3 -m quantbench generate $checkpoint -p "The capital of France is" -n 256 $flags --json \
    > $OUT/generate${flags:+-compiled}.json 2> $OUT/generate${flags:+-compiled}.err
  stamp "generate $flags rc $?"
done
tar cJf $OUT_FINAL/generate.tar.xz -C $OUT .
cat $OUT/tests.log; grep decode $OUT/bench.log
python3 -c "import json,sys; [print(f, {k: v for k, v in json.load(open(f)).items() if k != 'text'}) for f in sys.argv[1:]]" \
  $OUT/generate*.json; cat $OUT/times.log
