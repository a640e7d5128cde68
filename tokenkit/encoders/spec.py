"""What identifies a grid feature extractor: the spec that features stores and codebooks record.

Every family (CLIP, timm, HOG) maps (B, 3, S, S) normalised views to (B, G*G, C) float32 patch features,
row-major over the grid; the spec holds everything needed to rebuild that exact function.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class EncoderSpec:
    family: str  # "clip" (open_clip) | "timm" | "hog" | "pixels"
    model: str
    pretrained: str  # a tag, a checkpoint path, or "none" (seeded random init; HOG has no weights)
    weights_id: str  # the tag, "sha256:<hex>" of a checkpoint file, "none:seed=<seed>", or "none"
    arch: str  # clip: "resnet" | "vit"; timm: the model's class name; hog, pixels: the family
    layer: int  # ViT block index (0-based); -1 where the family has no choice of layer
    image_size: int
    grid: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    seed: int = 0
    options: tuple[tuple[str, object], ...] = ()  # family settings as sorted (name, value) pairs (HOG's)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["options"] = tuple(sorted(d.get("options", {}).items()))
        return cls(**d)

    @property
    def patch(self) -> int:
        """Pixels per grid cell side."""
        return self.image_size // self.grid


def file_sha256(path: Path) -> str:
    """`sha256:<hex>` of a weights file: what identifies weights that have no tag."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return f"sha256:{h.hexdigest()}"
