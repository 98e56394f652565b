#!/bin/bash
# Rows taken in turn against fixed batches on the CPU: the quickstart checkpoint (SmolLM2-135M, int4-g128 RTN,
# packed float32), 32 chat questions in 8 rows, greedy, at most 128 and 256 new tokens, each way timed over the
# whole list, alternated. After `make quickstart`; `source .assets/env.sh`.
python bench/prompt_rows.py runs/quickstart --rows 8 --max-new-tokens 128 --repeat 2 2>&1 | grep -v -i warn
python bench/prompt_rows.py runs/quickstart --rows 8 --max-new-tokens 256 --repeat 2 2>&1 | grep -v -i warn
