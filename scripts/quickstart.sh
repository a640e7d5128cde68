#!/usr/bin/env bash
# The main job on the embedded default: ELPV solar-cell images from PyPI, a seeded random-init CLIP
# (no weights can be downloaded here), k-CLIP codebook, token cache. Re-running reuses what is built.
#   bash scripts/quickstart.sh [RUN_DIR]         (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/quickstart}
bash scripts/setup.sh demo
export PATH="$PWD/.venv/bin:$PATH"
stage() { local t0=$SECONDS; "$@"; echo "[quickstart] $1 $2: $((SECONDS - t0)) s"; }
mkdir -p "$RUN"
stage python scripts/export_elpv.py "$RUN/elpv"
ENC=(--model tokenkit-tiny-vit --pretrained none --grid 14)
[ -f "$RUN/features/manifest.json" ] || stage tokenkit features "$RUN/elpv/type/train" "$RUN/features" "${ENC[@]}" \
  --max-patches 200000 --workers 2 --resume
[ -f "$RUN/codebook.safetensors" ] || stage tokenkit codebook "$RUN/features" "$RUN/codebook.safetensors" \
  --k 256 --niter 20 --nredo 2
[ -f "$RUN/tokens/manifest.json" ] || stage tokenkit tokenize "$RUN/elpv/type/train" "$RUN/codebook.safetensors" \
  "$RUN/tokens" --views 2 --format both --workers 2 --resume
tokenkit verify "$RUN/tokens"
tokenkit inspect "$RUN/tokens"
KEY=$(python -c "from tokenkit.store import TokenStore; print(TokenStore.open('$RUN/tokens').read([0])['keys'][0])")
tokenkit show "$RUN/tokens" "$KEY" --out "$RUN/tokens.png"
echo "[quickstart] done: token store $RUN/tokens, picture $RUN/tokens.png"
