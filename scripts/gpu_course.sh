#!/usr/bin/env bash
# The GPU run of issue 16 with the real teacher: one prepared script for a lent GPU machine (no network
# there, at most 64 MiB per command, 15 minutes of device time in all, start-up included).
#
#   here:   python scripts/gpu_ship.py pack --wheels       # .gpu/: payload.json + part-01-of-03 ... (40 MiB each)
#   device: run("python3 scripts/gpu_ship.py receive .gpu/part-01-of-03", carry=[".gpu/payload.json", ".gpu/part-01-of-03"])
#           run("python3 scripts/gpu_ship.py receive .gpu/part-02-of-03", carry=[... part-02 ...])   # back to back:
#           run("bash scripts/gpu_course.sh .gpu/part-03-of-03", carry=[... part-03 ...])          # /tmp lasts ~30 s idle
#   here:   bash scripts/gpu_course.sh --dry-run            # the same packing, transfer and checks on the CPU
#
# On the device, after the last part: join and check the payload (gpu_ship.py assemble: the GGUF and the
# Austen splits against data/MANIFEST.json), install the wheels, convert the real teacher (kdlab prepare,
# KDLAB_TEACHER_GGUF), then each stage under its own time limit, results to $OUT: the CUDA tests,
# bench.py's CUDA section (tokens/s, peak memory, MFU, eager and compiled, largest batch), the notebooks
# at the `gpu` profile (per-notebook times), and the reference runs at the gpu profile's sizes.
# Stage limits sum to about 9 minutes so that one command (<= 10 min) holds them and a rerun still fits.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--dry-run" ]; then
  # The CPU rehearsal of everything before the first CUDA call: pack, one process per part as one
  # command per part, join, check, convert the teacher from the joined GGUF, compare with data/teacher.
  set -e
  PY=${PY:-.venv/bin/python}
  WORK=$(mktemp -d /tmp/kdlab-dry.XXXX)
  trap 'rm -rf "$WORK"' EXIT
  $PY scripts/gpu_ship.py pack --out "$WORK/.gpu" ${WHEELS:+--wheels}
  for part in "$WORK"/.gpu/part-*; do
    $PY scripts/gpu_ship.py receive "$part" --store "$WORK/store"
  done
  $PY scripts/gpu_ship.py assemble --store "$WORK/store" --to "$WORK/payload"
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  $PY - "$WORK" "$tree" <<'EOF'
import json, os, sys
from pathlib import Path
work, tree = Path(sys.argv[1]), int(sys.argv[2])
meta = json.loads((work / ".gpu" / "payload.json").read_text())
for p in meta["parts"]:  # what each device command carries: the working tree, payload.json and one part
    carried = tree + (work / ".gpu" / "payload.json").stat().st_size + p["bytes"]
    print(f"{p['name']}: the command carries {carried / 2**20:.1f} MiB of the 64 MiB limit", flush=True)
    assert carried <= 64 * 2**20, f"{p['name']} does not fit one command: {carried / 2**20:.1f} MiB"
EOF
  # the teacher converted from the joined GGUF equals the one `make setup` made from the wheel's file
  KDLAB_TEACHER_GGUF="$WORK/payload/gguf/$($PY -c "import json; print(json.load(open('data/MANIFEST.json'))['teacher']['gguf']['file'])")" \
    $PY - "$WORK" <<'EOF'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from kdlab.models import prepare_teacher
work = Path(sys.argv[1])
made = prepare_teacher(work / "data")
a, b = load_file(made / "model.safetensors"), load_file("data/teacher/smollm2-135m/model.safetensors")
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "converted teacher differs"
print(f"teacher converted from the joined GGUF: {len(a)} tensors, all equal to data/teacher's", flush=True)
EOF
  echo "dry run passed: packing, transfer by parts, reassembly, checksums, conversion"
  exit 0
fi

# ---------------------------------------------------------------- on the device
# what comes back from $OUT is at most 8 files: the logs go to $RES and come back as one archive
OUT=${OUT:-runs/gpu-course}
RES=/tmp/gpu-course
mkdir -p "$OUT" "$RES"
LAST=${1:?the last part (.gpu/part-NN-of-NN) carried by this command}
python3 scripts/gpu_ship.py receive "$LAST" || exit 2
python3 scripts/gpu_ship.py assemble --to /tmp/kdlab-payload || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/kdlab-payload/whl/*.whl \
  || exit 2
export PYTHONPATH=/tmp/site:$PWD
mkdir -p data/austen && cp /tmp/kdlab-payload/austen/*.jsonl data/austen/
export KDLAB_TEACHER_GGUF=$(ls /tmp/kdlab-payload/gguf/*.gguf)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$RES/device.txt"
timeout 90 python3 -m kdlab prepare 2>&1 | tail -3 | tee "$RES/prepare.txt"

stage() {  # name, seconds, command...: one stage under its own limit; its log in $RES/<name>.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$RES/stages.txt"
  tail -n 15 "$RES/$name.txt"
}
stage cuda-tests 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_fused_loss.py
stage bench-cuda 150 python3 benchmarks/bench.py cuda --device cuda
KDLAB_PROFILE=gpu stage notebooks-gpu 240 python3 scripts/run_notebooks.py --profile gpu --out "$RES/notebooks" --no-record
stage reference-gpu 90 python3 scripts/reference_runs.py --steps 1500 --batch-size 16 --seq-len 256 --eval-every 50 \
  --eval-batches 16 --arms default lm-only
mkdir -p "$RES/reference" && cp -r notebooks/reference/default notebooks/reference/lm-only "$RES/reference/"
tar czf "$OUT/gpu-course.tgz" -C "$RES" . && cp "$RES/stages.txt" "$OUT/"
