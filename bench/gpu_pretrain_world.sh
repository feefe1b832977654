#!/usr/bin/env bash
# Pretrain the synthetic world's base model on a CUDA machine, in one call.
#
# Why: on the 2-core CPU box the base model's sample MQ grows with the training compute and the
# batch (docs/LOG.md): 0.25 at batch 8 after 41 minutes, 0.44 at batch 32 after 44, against a
# target of ~0.77 (80% of a clean render's). A GPU sees tens of times the videos in minutes, at
# a larger batch. Nothing here has run on a GPU yet: the script checks the device against the
# CPU and smoke-tests the CUDA path for a few seconds first, and stops with its error if either fails.
#
# From this machine, with the device tool's `run` (carry [".whl"]: the diffusers and
# importlib_metadata wheels the device lacks; the device README shows the `pip download` line):
#   bash bench/gpu_pretrain_world.sh "$OUT" 6          # minutes of training (default 6)
# Back here (CPU): copy $OUT/base_model/* into a folder, then
#   python -m sage_fast.world.evaluate --checkpoint <folder>     # the model card, ~1 min
# and ship it into sage_fast/world/assets/base_model/ only if the card is inside the window.
# Environment overrides: BATCH (512), LR (2e-3), LAYERS (6), HEADS (4), WORKERS (8); DEVICE (cuda)
# and AUTOCAST (bfloat16) let the same lines run on a CPU as a check of the script itself:
#   DEVICE=cpu AUTOCAST=none BATCH=4 LAYERS=1 WORKERS=1 THREADS=1 PY=.venv/bin/python bash bench/gpu_pretrain_world.sh /tmp/o 0.2
# The checkpoint must come back as one file of at most 16 MiB (the device's limit): at
# 4 heads x 32, 6 layers it is 7.75M parameters, 14.8 MiB in float16 (5 heads x 32 x 4 layers:
# 15.5 MiB; 6 x 32 x 4 would not fit).
set -uo pipefail
OUT=${1:?usage: gpu_pretrain_world.sh OUT_DIR [MINUTES]}
MIN=${2:-6}
BATCH=${BATCH:-512}; LR=${LR:-2e-3}; LAYERS=${LAYERS:-6}; HEADS=${HEADS:-4}; WORKERS=${WORKERS:-8}
DEVICE=${DEVICE:-cuda}; AUTOCAST=${AUTOCAST:-bfloat16}; THREADS=${THREADS:-4}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ "$DEVICE" != cpu ] && compgen -G ".whl/*.whl" > /dev/null; then  # wheels carried for packages the device lacks
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${SAGE_FAST_COMMIT:-unknown}  minutes $MIN  batch $BATCH  lr $LR  layers $LAYERS  heads $HEADS"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# pure Python install (the C++ op is not used by pretraining); its log stays in /tmp (8 files come back)
if [ "$DEVICE" = cpu ]; then :  # the check of the script: the package is already installed here
elif ! SAGE_FAST_NO_EXT=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1; then
  tail -20 /tmp/install.log; exit 1
fi
ARCH=(--heads "$HEADS" --head-dim 32 --layers "$LAYERS" --freeze-byt5-hidden --x0-weight-floor 0.3)
# 1. does the device compute what the CPU does? (one batch's velocity, float32 and bf16 autocast)
if ! "$PY" -m sage_fast.world.pretrain --device "$DEVICE" --autocast none --check-device --threads "$THREADS" \
    > "$OUT/smoke.log" 2>&1; then
  tail -30 "$OUT/smoke.log"; exit 1
fi
tail -1 "$OUT/smoke.log"
if ! "$PY" -m sage_fast.world.pretrain --device "$DEVICE" --autocast "$AUTOCAST" --check-device --threads "$THREADS" \
    >> "$OUT/smoke.log" 2>&1; then
  tail -30 "$OUT/smoke.log"; exit 1
fi
tail -1 "$OUT/smoke.log"
# 2. smoke test of the training path (a few seconds; its last lines give ms a step): errors show
#    here, before the budget is spent; if the data-loading workers are what fails, go on without
smoke() {
  "$PY" -m sage_fast.world.pretrain --device "$DEVICE" --autocast "$AUTOCAST" --batch "$BATCH" --workers "$1" \
    --threads "$THREADS" "${ARCH[@]}" --steps 60 --warmup 10 --log-every 20 --skip-eval --out /tmp/smoke >> "$OUT/smoke.log" 2>&1
}
if ! smoke "$WORKERS"; then
  echo "smoke test with $WORKERS workers failed; again with 0"; tail -5 "$OUT/smoke.log"
  WORKERS=0
  if ! smoke 0; then tail -30 "$OUT/smoke.log"; exit 1; fi
fi
tail -3 "$OUT/smoke.log"
# 3. the run: cosine over the time budget, EMA checkpoint every minute (a killed call still
#    leaves the last one in $OUT/base_model)
"$PY" -m sage_fast.world.pretrain --device "$DEVICE" --autocast "$AUTOCAST" --batch "$BATCH" --workers "$WORKERS" \
  --threads "$THREADS" "${ARCH[@]}" --lr "$LR" --warmup 300 --steps 100000000 --lr-schedule time \
  --time-budget-min "$MIN" --save-every-min 1 --log-every 250 --skip-eval --out "$OUT/base_model" \
  > "$OUT/pretrain.log" 2>&1 &
pid=$!
tail -f --pid=$pid "$OUT/pretrain.log" | grep --line-buffered -E "pretrain:|step .*000 |budget|saved|Error|error"
wait $pid
rc=$?
ls -la "$OUT/base_model"
exit $rc
