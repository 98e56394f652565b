#!/bin/bash
# What sampling costs a CPU decode: the quickstart checkpoint (SmolLM2-135M, int4-g128 RTN, packed float32)
# decoding up to 128 tokens greedy and sampled (temperature 0.8; top-k 50; top-p 0.9: a sort of the 49,152
# logits a step), fixed seed, each setting twice in alternation. After `make quickstart`; `source .assets/env.sh`.
for round in 1 2; do
  for args in "" "-t 0.8" "-t 0.8 --top-k 50" "-t 0.8 --top-p 0.9"; do
    quantbench generate runs/quickstart -p "The capital of France is" -n 128 $args --seed 1 --json 2>/dev/null \
      | python -c "
import json, sys; r = json.load(sys.stdin)
print('${args:-greedy}'.ljust(20), r['new_tokens'], 'tokens', 'decode %.1f tok/s' % r['decode_tokens_per_s'])"
  done
done
