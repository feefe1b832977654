#!/usr/bin/env bash
# Every GPU check in one call on a CUDA machine (a command of at most 2000 characters), from the
# repository root:
#   SAGE_FAST_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_validate.sh "$OUT"
# It builds sage_fast._C with the CUDA twin against the device's torch, runs the `gpu`-marked
# tests and the kernel test files natively, then bench/run.py on CUDA at the real latent sizes.
# Logs and results land in $OUT (8 files at most come back); copy them to bench/results/.
set -uo pipefail
OUT=${1:?usage: gpu_validate.sh OUT_DIR}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels carried for packages the device lacks
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${SAGE_FAST_COMMIT:-unknown}"
} > "$OUT/env.txt" 2>&1
if ! SAGE_FAST_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_sde.py tests/test_cpp_ops.py tests/test_ops.py \
  tests/test_noise.py tests/test_equalizer.py > "$OUT/pytest-kernels.log" 2>&1
tail -3 "$OUT/pytest-kernels.log"
python3 bench/run.py --device cuda --sizes authors,480p,720p --out "$OUT" --tag bench-cuda 2>&1 | tail -40
python3 bench/rollout.py --device cuda --out "$OUT" 2>&1 | tail -5
# The hunyuanvideo15_480p recipe's code path on the GPU (bf16 autocast, CUDA graphs, VAE and
# text encoders on the device) with a random toy pipeline of the real classes: plumbing, not numbers.
HV_TOY=/tmp/sage_fast_hv15_toy
{
  echo "== hunyuanvideo15_480p recipe on a toy pipeline (device ${HV_DEVICE:-cuda})"
  rm -rf "$HV_TOY" && python3 -m sage_fast.models.tiny_pipeline "$HV_TOY/pipe" > /dev/null &&
  python3 -m sage_fast.train --recipe hunyuanvideo15_480p video.pipeline="$HV_TOY/pipe" model.checkpoint="$HV_TOY/pipe" \
    video.prompt_file="$HV_TOY/pipe/prompts.txt" video.reward=clip_score="$HV_TOY/pipe/clip" video.frames=5 \
    video.height=32 video.width=32 sampler.num_steps=4 grpo.samples_per_rank=4 grpo.group_size=2 grpo.train_steps=2 \
    grpo.micro_batch=2 dist.sp=1 run.steps=2 run.eval_every=1 run.output_dir="$HV_TOY/run" run.device="${HV_DEVICE:-cuda}"
  echo "exit $?"
} >> "$OUT/pytest-gpu.log" 2>&1
tail -4 "$OUT/pytest-gpu.log"
# The Wan recipes' code path on the GPU (one expert, then Wan 2.2's two) with random toy Wan
# pipelines of the real classes, rewarded by the toy CLIP above: plumbing, not numbers.
{
  for EXPERTS in "" "--two-experts"; do
    RECIPE=wan21_t2v_1.3b_480p; [ -n "$EXPERTS" ] && RECIPE=wan22_a14b_t2v_480p
    echo "== $RECIPE recipe on a toy Wan pipeline $EXPERTS (device ${HV_DEVICE:-cuda})"
    rm -rf "$HV_TOY/wan" && python3 -m sage_fast.models.tiny_wan_pipeline "$HV_TOY/wan" $EXPERTS > /dev/null &&
    python3 -m sage_fast.train --recipe $RECIPE video.pipeline="$HV_TOY/wan" model.checkpoint="$HV_TOY/wan" \
      video.prompt_file="$HV_TOY/wan/prompts.txt" video.reward=clip_score="$HV_TOY/pipe/clip" video.frames=5 \
      video.height=32 video.width=32 video.num_eval_prompts=2 model.lora_rank=4 model.lora_alpha=4 \
      sampler.num_steps=4 grpo.samples_per_rank=4 grpo.group_size=2 grpo.train_steps=2 grpo.micro_batch=2 \
      run.steps=2 run.eval_every=1 run.output_dir="$HV_TOY/run_$RECIPE" run.device="${HV_DEVICE:-cuda}"
    echo "exit $?"
  done
} >> "$OUT/pytest-gpu.log" 2>&1
tail -4 "$OUT/pytest-gpu.log"
