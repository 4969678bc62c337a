#!/usr/bin/env bash
# The CUDA checks, as run on a lent GPU machine (no network there): the CUDA tests, throughput and
# memory of the real architecture, the seed's logging cost with GPU syncs, and torchrun over NCCL.
# Results go to $OUT (default runs/gpu-check); docs/cuda.md records them with the device named.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ]; then  # packages the machine lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/device.txt"
echo "== CUDA tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_models_precision.py \
  2>&1 | grep -v "^Writing\|^Loading" | tail -25 | tee "$OUT/pytest.txt"
echo "== torchrun, NCCL, 1 process"
T=runs/log-cost/teacher
timeout 120 python3 scripts/log_cost.py --prepare-only 2>&1 | tail -1
timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m kdlab train --teacher $T --student tiny \
  --student-init random --seq-len 64 --batch-size 4 --max-steps 20 --log-every 10 --device cuda --out-dir runs/nccl \
  2>&1 | grep -v "^Writing\|^Loading" | tail -8 | tee "$OUT/torchrun.txt"
echo "== throughput and memory"
timeout 240 python3 scripts/cuda_bench.py 2>&1 | tee "$OUT/bench.txt"
echo "== logging cost"
timeout 200 python3 scripts/log_cost.py --steps 500 2>&1 | grep -v "^Writing" | tee "$OUT/logcost.txt"
