# Sourced by the device calls' scripts: `. docs/data/kernels-h100/call_setup.sh WORKDIR CACHE` keeps $OUT as
# OUT_FINAL and writes to WORKDIR (one archive comes back: the count of files is limited), defines `stamp`
# (seconds since the start, into times.log), installs the carried .gpu/wheels, unpacks the carried CUDA libraries
# .gpu/CACHE into QUANTBENCH_CUDA_CACHE and records the GPU.
set -o pipefail
OUT_FINAL=$OUT; OUT=$1; mkdir -p $OUT
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $OUT/times.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:bench
mkdir -p /tmp/cc && tar xJf .gpu/$2 -C /tmp/cc
export QUANTBENCH_CUDA_CACHE=/tmp/cc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
