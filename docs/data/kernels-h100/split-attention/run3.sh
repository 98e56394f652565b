#!/bin/bash
# Run 3, on the machine of run 2 (same card, a minute later): batches 1 and 8 on the split kernel once more (B3),
# without the tests. The call was:
#   export OUT; sed -e 's/^one A2_sdpa .*//' -e 's/^one B2_split_4096.*//' -e 's/^one A2_sdpa_4096.*//' \
#     -e 's/B2_split/B3_split/' -e 's/run2.tar.xz/run3.tar.xz/' -e 's/^timeout 90 python3 -m pytest.*/true \\/' \
#     docs/data/kernels-h100/split-attention/run2.sh > /tmp/run3.sh && bash /tmp/run3.sh
