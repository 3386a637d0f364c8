#!/usr/bin/env bash
# The GPU check: <= 5 minutes on one GPU. Run from the repository root in an environment where
# `pip install -e ".[dev,bench]"` was done:
#     bash scripts/gpu_check.sh [OUT_DIR]
# 1. the test subset marked `gpu` (bf16 autocast, torch.compile, a bf16-mixed fit on CUDA);
# 2. a 200-step bf16-mixed multi-task fit with the `B` trunk preset (after a 200-step stage-1
#    tokenizer, both on the embedded demo data), printing the training throughput;
# 3. scripts/benchmark.py dit on cuda for the B preset (fp32 and bf16, torch.compile): training step
#    and CFG sampling vs facebookresearch/DiT (when .peers/DiT holds its clone) and diffusers, with MFU.
set -euo pipefail
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export MULTIMODAL_CACHE=${MULTIMODAL_CACHE:-$OUT/cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 1. gpu tests"
python -m pytest -q -m gpu tests -p no:cacheprovider

echo "== 2. stage 1 (200 steps) then a 200-step bf16 multi-task fit, B preset"
GPU=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.enable_progress_bar false)
python -m multimodal fit --config configs/tokenizer.yaml "${GPU[@]}" --trainer.max_steps 200 \
    --trainer.val_check_interval 200 --trainer.limit_val_batches 2 --trainer.default_root_dir "$OUT/stage1"
start=$(date +%s.%N)
python -m multimodal fit --config configs/multitask.yaml "${GPU[@]}" --trainer.max_steps 200 \
    --trainer.val_check_interval 200 --trainer.limit_val_batches 2 --trainer.default_root_dir "$OUT/multitask" \
    --model.init_args.backbone.init_args.tokenizer_ckpt "$OUT/stage1" \
    --model.init_args.backbone.init_args.trunk.init_args.preset B \
    --model.init_args.heads.classify.init_args.trunk_hidden 768 \
    --model.init_args.heads.caption.init_args.trunk_hidden 768 \
    --model.init_args.heads.transcribe.init_args.trunk_hidden 768
end=$(date +%s.%N)
python - "$start" "$end" <<'EOF'
import sys
start, end = map(float, sys.argv[1:])
print(f"multi-task fit, 200 steps x 4 tasks (B preset, bf16-mixed), incl. start-up and one validation: "
      f"{end - start:.1f} s, {200 / (end - start):.2f} steps/s")
EOF

echo "== 3. DiT benchmark on cuda (B preset, fp32 and bf16, compile) with MFU"
python scripts/benchmark.py dit --device cuda --preset B --compile --batch 64 --train-batch 64
