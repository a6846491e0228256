#!/usr/bin/env bash
# One device session for benchmarks/sd_cost.py (issues 12 and 15): SD 1.5, SDXL and FLUX sizes, every lever,
# in about 8 minutes on one H200, every number written under $OUT as it is measured.
#
# The device image has PyTorch, torchvision, transformers and timm but not diffusers or omegaconf: carry them as
# wheels (pure Python). Once, on the development machine, from the repository root (runs/ is git-ignored):
#
#   .venv/bin/pip download --no-deps -d runs/sd_cost_wheels diffusers==0.42.1 omegaconf==2.4.0 importlib_metadata==10.2.0
#
# then one device call:  run(command="bash benchmarks/gpu_session.sh", carry=["runs/sd_cost_wheels"], timeout_s=560)
#
# What comes back (7 files, the device tool returns at most 8): summary.txt (GPU, versions, exit status and
# seconds of each size), and per size NAME.log (the printed tables) and NAME.json (the same numbers; written
# after every row, so a size cut off by its time limit still returns what it measured). Time limits per size
# add up to 480 s; torch.compile rows run last within sd15 because compiling is the slowest part.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sd_cost_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"

if ! "$PY" -c "import diffusers, omegaconf" 2>/dev/null; then
  if ! ls runs/sd_cost_wheels/*.whl >/dev/null 2>&1; then
    echo "diffusers / omegaconf missing and no wheels in runs/sd_cost_wheels: see this script's header" | tee "$SUMMARY"
    exit 2
  fi
  "$PY" -m pip install -q --no-deps --no-index --target /tmp/sd_cost_deps runs/sd_cost_wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/sd_cost_deps
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} >"$SUMMARY" 2>&1

size() {  # size NAME LIMIT_SECONDS ARGS...: one sd_cost.py run under a time limit, tables to NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout --signal=INT --kill-after=15 "$limit" "$PY" benchmarks/sd_cost.py --size "$name" "$@" \
    --json-out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  echo "$name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s ($*)" | tee -a "$SUMMARY"
}

# SD 1.5, 512 px, batch 8, fp16: every lever (bf16 against the fp16 baseline), compile and "all of them" last.
size sd15 230 --all-levers
# SDXL, 1024 px, batch 4, fp16: every lever but torch.compile (its compile time would not fit here).
size sdxl 125 --channels-last --sdpa-vae --bf16-backward --cuda-graphs --max-batch
# FLUX.1-dev, 1024 px, batch 2, bf16 (so the bf16 lever is moot and reported as skipped), 16-channel VAE.
size flux 125 --channels-last --sdpa-vae --bf16-backward --cuda-graphs --max-batch
echo "total: $SECONDS s" | tee -a "$SUMMARY"
