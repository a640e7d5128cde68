"""Draw docs/figures/pipeline.png: the data flow from images to evaluation (matplotlib)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STAGES = [
    ("images", "folder or\nwebdataset tars", "#dfe9f5"),
    ("tokenkit features", "CLIP grid features\nzarr, float16", "#e8f3e1"),
    ("tokenkit codebook", "k-means (faiss / torch)\ncentroids + sha256", "#e8f3e1"),
    ("tokenkit tokenize", "V views -> CLIP ->\nnearest centroid", "#e8f3e1"),
    ("token cache", "zarr v3 (random access)\n+ webdataset (stream)", "#fdf1d8"),
    ("mapet pretrain", "MaPeT / BEiT\nno CLIP at train time", "#f6e0e0"),
    ("mapet knn / linprobe\n/ finetune / export", "checkpoint ->\nevaluation, timm", "#f6e0e0"),
]


def main(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(14, 2.6))
    ax.set_xlim(0, len(STAGES) * 2)
    ax.set_ylim(0, 2.2)
    ax.axis("off")
    for i, (title, body, colour) in enumerate(STAGES):
        x = i * 2 + 0.1
        ax.add_patch(FancyBboxPatch((x, 0.3), 1.7, 1.6, boxstyle="round,pad=0.03", fc=colour, ec="#555"))
        ax.text(x + 0.85, 1.55, title, ha="center", va="center", fontsize=9.5, weight="bold")
        ax.text(x + 0.85, 0.85, body, ha="center", va="center", fontsize=8.5)
        if i:
            ax.add_patch(
                FancyArrowPatch((x - 0.3, 1.1), (x - 0.02, 1.1), arrowstyle="-|>", mutation_scale=14)
            )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/figures/pipeline.png"))
