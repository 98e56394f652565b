#!/bin/bash
# quantbench generate on the CPU: the quickstart checkpoint (SmolLM2-135M, int4-g128 RTN) decoding 128 tokens, packed
# kernels against dequantized, float32 and bfloat16, eager and compiled, each setting twice in alternation.
# After `make quickstart`; `source .assets/env.sh`.
for round in 1 2; do
  for args in "--kernels" "--dequantized" "--kernels --dtype bfloat16" "--dequantized --dtype bfloat16" \
              "--kernels --compile" "--dequantized --compile"; do
    quantbench generate runs/quickstart -p "The capital of France is" -n 128 $args --json 2>/dev/null | python -c "
import json, sys; r = json.load(sys.stdin)
print('$args'.ljust(34), r['dtype'], r['new_tokens'], 'prefill %.0f ms' % (1e3 * r['prefill_s']),
      'warm-up %d step(s) %.0f ms' % (r['warmup_steps'], 1e3 * r['warmup_s']),
      'decode %.1f tok/s' % r['decode_tokens_per_s'])"
  done
done
