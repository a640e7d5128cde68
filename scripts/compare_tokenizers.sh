#!/usr/bin/env bash
# The quickstart's MaPeT budget with three tokenizers, one table: HOG k-means (the quickstart's own run),
# pooled-pixel k-means and random-init CLIP k-means (the tokenizer the quickstart used before HOG), each
# judged by what its codes say about the cell type, how well MaPeT learned to predict them, the linear probe
# of both tasks and the few-label fine-tuning -> RUN/tokenizers.md.
#   bash scripts/compare_tokenizers.sh [RUN_DIR]   (default runs/quickstart; runs the quickstart first if needed)
# The same size variables as the quickstart (LIMIT, EPOCHS, BATCH, FT_EPOCHS, FT_BATCH) are passed on to it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/quickstart}
bash scripts/quickstart.sh "$RUN"  # the HOG row, and the images, budget and settings the others reuse
export PATH="$PWD/.venv/bin:$PATH"
EPOCHS=${EPOCHS:-12} BATCH=${BATCH:-64} FT_EPOCHS=${FT_EPOCHS:-20} FT_BATCH=${FT_BATCH:-16}
TAG=tokenizers TIMINGS="$RUN/timings-tokenizers.txt"
source scripts/stages.sh
: > "$TIMINGS"
ELPV="$RUN/elpv"
WARMUP=$(((EPOCHS + 29) / 30))
declare -A ENCODER=(
  [pixels]="--model pixels --grid 7 --image-size 112"
  [clip]="--model tokenkit-tiny-vit --pretrained none --grid 7"
)
for T in pixels clip; do
  D="$RUN/tokenizer-$T"
  mkdir -p "$D/eval"
  stage "$T features" "$D/features/manifest.json" tokenkit features "$ELPV/type/train" "$D/features" \
    ${ENCODER[$T]} --max-patches 100000 --workers 2 --resume --quiet
  stage "$T codebook" "$D/codebook.safetensors" tokenkit codebook "$D/features" "$D/codebook.safetensors" \
    --k 256 --niter 20 --nredo 2 --resume --quiet
  stage "$T tokenize" "$D/tokens/manifest.json" tokenkit tokenize "$ELPV/type/train" "$D/codebook.safetensors" \
    "$D/tokens" --views 2 --format zarr --workers 2 --resume --quiet
  stage "$T pretrain" "$D/pretrain-mapet/done" bash -c "mapet pretrain --tokens '$D/tokens' \
    --out '$D/pretrain-mapet' --model mapet_micro --objective mapet --epochs $EPOCHS --batch-size $BATCH \
    --lr 1e-3 --warmup-epochs $WARMUP --workers 2 --log-every 5 --resume auto --quiet && touch '$D/pretrain-mapet/done'"
  for TASK in type defect; do
    stage "$T linprobe $TASK" "$D/eval/linprobe-$TASK.json" mapet linprobe --checkpoint "$D/pretrain-mapet/last.pt" \
      --train "$ELPV/$TASK/train" --val "$ELPV/$TASK/val" --crop-pct 1.0 --workers 2 --result "$D/eval/linprobe-$TASK.json" --quiet
  done
  stage "$T finetune" "$D/eval/finetune-type.json" bash -c "mapet finetune --lr 1e-3 --checkpoint '$D/pretrain-mapet/last.pt' \
    --train '$ELPV/type/train-10pct' --val '$ELPV/type/val' --out '$D/finetune' --epochs $FT_EPOCHS \
    --warmup-epochs 2 --batch-size $FT_BATCH --crop-pct 1.0 --workers 2 --resume auto --quiet && \
    mapet validate --checkpoint '$D/finetune/last.pt' --val '$ELPV/type/val' --crop-pct 1.0 --workers 2 \
    --result '$D/eval/finetune-type.json' --quiet"
done
python scripts/report.py "$RUN" --tokenizers
