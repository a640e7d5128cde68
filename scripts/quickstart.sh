#!/usr/bin/env bash
# The main job on the embedded default, end to end through the real CLIs:
#   ELPV solar-cell images (PyPI) -> tokenkit features / codebook / tokenize: HOG k-means (MaskFeat's target,
#   quantized: the weight-free tokenizer whose codes mean something here) -> mapet pretrain (MaPeT and BEiT,
#   same budget) -> k-NN and linear probe of random-init / BEiT / MaPeT encoders on cell type and defect class,
#   and fine-tuning of the three with one recipe on the cell-type labels of 10% of the training images (the
#   pre-training read all of them, unlabelled) -> RUN/report.md.
#   bash scripts/quickstart.sh [RUN_DIR]         (default runs/quickstart; re-running reuses what is built)
# Sizes can be overridden for a smoke run: LIMIT (images per stratum), EPOCHS, BATCH, FT_EPOCHS, FT_BATCH.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/quickstart}
EPOCHS=${EPOCHS:-12}
BATCH=${BATCH:-64}
LIMIT=${LIMIT:-}
FT_EPOCHS=${FT_EPOCHS:-20}
FT_BATCH=${FT_BATCH:-16}
bash scripts/setup.sh demo
export PATH="$PWD/.venv/bin:$PATH"
# HOG on the 112-px views of mapet_micro's 7 x 7 grid: 16-px patches of four 8-px cells; ELPV is greyscale,
# so one channel's histograms (--hog-channels max: 36 values a patch) say what three copies would
ENC=(--model hog --grid 7 --image-size 112 --hog-channels max)
K=256 VIEWS=2 MODEL=mapet_micro
# a run folder is reused only with the settings it was built with
SETTINGS="LIMIT=${LIMIT:-all} EPOCHS=$EPOCHS BATCH=$BATCH FT_EPOCHS=$FT_EPOCHS FT_BATCH=$FT_BATCH ${ENC[*]} K=$K VIEWS=$VIEWS MODEL=$MODEL"
if [ -f "$RUN/settings" ] && [ "$(cat "$RUN/settings")" != "$SETTINGS" ]; then
  echo "quickstart: error: $RUN was built with '$(cat "$RUN/settings")', not '$SETTINGS'; pass another run folder or delete it" >&2
  exit 2
fi
mkdir -p "$RUN/eval"
echo "$SETTINGS" > "$RUN/settings"
: > "$RUN/timings.txt"
TAG=quickstart TIMINGS="$RUN/timings.txt"
source scripts/stages.sh
T0=$SECONDS
ELPV="$RUN/elpv"
stage export "$ELPV/split.json" python scripts/export_elpv.py "$ELPV" ${LIMIT:+--limit "$LIMIT"}
stage features "$RUN/features/manifest.json" tokenkit features "$ELPV/type/train" "$RUN/features" "${ENC[@]}" \
  --max-patches 100000 --workers 2 --resume --quiet
stage codebook "$RUN/codebook.safetensors" tokenkit codebook "$RUN/features" "$RUN/codebook.safetensors" \
  --k $K --niter 20 --nredo 2 --resume
stage tokenize "$RUN/tokens/manifest.json" tokenkit tokenize "$ELPV/type/train" "$RUN/codebook.safetensors" \
  "$RUN/tokens" --views $VIEWS --format both --workers 2 --resume --quiet
tokenkit verify "$RUN/tokens"
tokenkit inspect "$RUN/tokens" --labels
WARMUP=$(((EPOCHS + 29) / 30))  # the paper's share, 10 of 300 epochs, rounded up: 1 for 12, 2 for 60
for OBJ in mapet beit; do
  stage "pretrain $OBJ" "$RUN/pretrain-$OBJ/done" bash -c "mapet pretrain --tokens '$RUN/tokens' \
    --out '$RUN/pretrain-$OBJ' --model $MODEL --objective $OBJ --epochs $EPOCHS --batch-size $BATCH \
    --lr 1e-3 --warmup-epochs $WARMUP --workers 2 --log-every 5 --resume auto --quiet && touch '$RUN/pretrain-$OBJ/done'"
done
for TASK in type defect; do
  for ENCODER in random beit mapet; do
    CK=random
    [ "$ENCODER" = random ] || CK="$RUN/pretrain-$ENCODER/last.pt"
    # --crop-pct 1.0: a solar cell fills its image and its edges carry evidence (monocrystalline cells have
    # chamfered corners, polycrystalline ones do not): the ImageNet crop (0.875) cuts the cell-type linear
    # probe from ~93% to ~82% here
    for EVAL in knn linprobe; do
      OUT="$RUN/eval/$EVAL-$ENCODER-$TASK.json"
      stage "$EVAL $ENCODER $TASK" "$OUT" mapet "$EVAL" --checkpoint "$CK" --model $MODEL \
        --train "$ELPV/$TASK/train" --val "$ELPV/$TASK/val" --crop-pct 1.0 --workers 2 --result "$OUT" --quiet
    done
  done
done
# fine-tuning with few labels: random init (scratch), BEiT- and MaPeT-pretrained, one recipe (BEiT's: layer
# decay 0.65, drop path 0.1, label smoothing 0.1; lr 1e-3 at batch 16, 2 warmup epochs) on the 10% of the images whose
# cell type is kept, then `mapet validate` for every val image's answer
for ENCODER in random beit mapet; do
  CK=random
  [ "$ENCODER" = random ] || CK="$RUN/pretrain-$ENCODER/last.pt"
  OUT="$RUN/eval/finetune-$ENCODER-type.json"
  stage "finetune $ENCODER type" "$OUT" bash -c "mapet finetune --checkpoint '$CK' --model $MODEL --lr 1e-3 \
    --train '$ELPV/type/train-10pct' --val '$ELPV/type/val' --out '$RUN/finetune-$ENCODER' --epochs $FT_EPOCHS \
    --warmup-epochs 2 --batch-size $FT_BATCH --crop-pct 1.0 --workers 2 --resume auto --quiet && \
    mapet validate --checkpoint '$RUN/finetune-$ENCODER/last.pt' --val '$ELPV/type/val' --crop-pct 1.0 \
    --workers 2 --result '$OUT' --quiet"
done
echo "total: $((SECONDS - T0)) s" >> "$RUN/timings.txt"
python scripts/report.py "$RUN"
# the same runs on `mapet report`'s general page (any runs: curves, results, verdicts, token maps)
mapet report "$RUN"/pretrain-{mapet,beit} "$RUN"/finetune-{random,beit,mapet} --out "$RUN/runs" >/dev/null
echo "[quickstart] done in $((SECONDS - T0)) s: report $RUN/report.md"
