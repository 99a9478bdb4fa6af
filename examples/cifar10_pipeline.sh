#!/usr/bin/env bash
# The whole short recipe on the shared CIFAR-10 data, from the command line (about 15 minutes on 2 CPU cores).
# Usage: bash examples/cifar10_pipeline.sh [DATA_ROOT] [WORK_DIR]
# DATA_ROOT is an ImageFolder; benchmarks/cifar10_short_recipe.py does the same with the exact
# train / calibration / validation split used for the published numbers.
set -euo pipefail
DATA=${1:-../shared/data/cifar10/train}
WORK=${2:-runs/cifar10-cfvit}
mkdir -p "$WORK"
vitconvert apply --recipe cfvit local-dir:benchmarks/checkpoints/cifar10-vit -o "$WORK/converted" --overwrite
vitconvert finetune "$WORK/converted" --data "$DATA" --max-images 10000 -o "$WORK/finetuned" --overwrite
vitconvert calibrate "$WORK/finetuned" --data "$DATA" --budget 50%
vitconvert eval "$WORK/finetuned" --data "$DATA" -o "$WORK/eval"
