#!/usr/bin/env bash
# Bigram vs nanoGPT's CPU GPT recipe across three learning rates, same steps and schedule
# lengths: one sweep (6 runs), then the comparison table and the val-loss plot.
#   experiments/bigram_vs_gpt_lr/run.sh            # full: 2000 steps per run
#   STEPS=200 experiments/bigram_vs_gpt_lr/run.sh  # a quick look
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
steps="${STEPS:-2000}"
.venv/bin/gptlab-train -m experiment=bigram,shakespeare_char_cpu optim.lr=1e-3,3e-3,1e-2 \
    trainer.max_steps="$steps" trainer.val_check_interval=$((steps / 8)) \
    trainer.enable_progress_bar=false logger.experiment_name=bigram_vs_gpt_lr
.venv/bin/gptlab-compare --experiment bigram_vs_gpt_lr --sweep latest \
    --plot "$here/val_loss.png" | tee "$here/results.txt"
