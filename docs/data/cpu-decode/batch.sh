#!/bin/bash
# Several prompts as one batch on the CPU: the quickstart checkpoint (SmolLM2-135M, int4-g128 RTN, packed float32)
# decoding 64 tokens for 1, 2, 4 and 8 prompts (the same 8 of 4–9 tokens, the first ones taken), greedy, tokens a
# second of all prompts together, each setting twice in alternation. After `make quickstart`; `source
# .assets/env.sh`.
prompts=("The capital of France is" "Once upon a time, in a land far away," "Water boils at" "My favourite colour"
         "The best way to learn a language is" "In 1969 the first" "def fibonacci(n):" "Three things to pack:")
for round in 1 2; do
  for count in 1 2 4 8; do
    args=(); for p in "${prompts[@]:0:$count}"; do args+=(-p "$p"); done
    quantbench generate runs/quickstart "${args[@]}" -n 64 --json 2>/dev/null | python -c "
import json, sys; r = json.load(sys.stdin); rows = r.get('prompts', [r])
print('$count prompt(s)'.ljust(12), sum(row['new_tokens'] for row in rows), 'tokens',
      'prefill %.0f ms' % (1e3 * r['prefill_s']), 'decode %.1f tok/s' % r['decode_tokens_per_s'])"
  done
done
