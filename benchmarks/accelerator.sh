#!/usr/bin/env bash
# The accelerator figures of benchmarks/RESULTS.md in one run on one GPU or one TPU host
# (budget: 8 minutes). For gpt2_small, gpt2_medium and gpt2_1b in bfloat16: train-step
# tokens/s, MFU (model FLOPs over the device's dense bf16 peak, stabjax/throughput.py) and
# the compiled step's memory per device, plain vs all units on (feedback + PSU linear +
# DMU dfix c~=0.5 + DTU keep=T/4) and all on with the PSU's exact value; then KV-cache
# generation against recomputation. On a GPU the plain model also runs with cuDNN flash
# attention (--dtu_attention=cudnn). Each step.py call interleaves its configurations, so
# the "vs plain" ratios come from one process.
#
#   bash benchmarks/accelerator.sh 2>&1 | tee accelerator.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The last runs on a GPU only (step.py skips it elsewhere).
ONLY="plain,+DTU keep=T/4 (all on),all on + PSU exact,plain + cuDNN attention"
# The batch is a multiple of 8 devices (a v5e-8 host); remat where activations would not fit.
$PY benchmarks/step.py --model=gpt2_small --dtype=bfloat16 --batch_size=16 --seq_len=1024 \
    --steps=5 --repeats=5 --only="$ONLY"
$PY benchmarks/step.py --model=gpt2_medium --dtype=bfloat16 --batch_size=16 --seq_len=1024 \
    --steps=4 --repeats=4 --remat --only="$ONLY"
$PY benchmarks/step.py --model=gpt2_1b --dtype=bfloat16 --batch_size=8 --seq_len=1024 \
    --steps=3 --repeats=3 --remat --scan_layers --only="$ONLY"
$PY benchmarks/generate.py --model=gpt2_small --dtype=bfloat16 --batch=8 --prompt_len=16 \
    --new_tokens=256 --repeats=3
