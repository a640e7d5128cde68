"""Grid feature extractors, one file per family, behind one spec: CLIP (open_clip), timm ViTs, HOG, pixels.

`resolve_spec` checks a model name and its settings and returns the EncoderSpec that features stores and
codebooks record; `load_encoder` rebuilds the exact extractor from it: (B, 3, S, S) views normalised with
the spec's mean and std -> (B, G*G, C) float32 patch features, row-major over the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenkit.encoders import clip, hog, pixels, timm_backbone
from tokenkit.encoders.hog import HOGConfig
from tokenkit.encoders.spec import EncoderSpec
from tokenkit.errors import MAX_SIDE, require, seed_check


def resolve_spec(
    model: str,
    pretrained: str = "none",
    grid: int = 14,
    image_size: int | None = None,
    layer: int = -1,
    seed: int = 0,
    hog_cfg: HOGConfig | None = None,
) -> EncoderSpec:
    """`model`: an open_clip name (ViT-B-16, RN50x64, ...), `timm:NAME[.TAG]`, `hog`, or `pixels`."""
    require(
        (
            ("--grid", grid, 1 <= grid <= 512, "in [1, 512]"),
            (
                "--image-size",
                image_size,
                image_size is None or 1 <= image_size <= MAX_SIDE,
                f"in [1, {MAX_SIDE}]",
            ),
            seed_check(seed),
        )
    )
    if hog_cfg is not None:
        hog_cfg.check_ranges()
    if model == "hog":
        return hog.resolve(grid, image_size, hog_cfg or HOGConfig())
    if model == "pixels":
        return pixels.resolve(grid, image_size)
    if model.startswith(timm_backbone.PREFIX):
        return timm_backbone.resolve(model, pretrained, grid, image_size, layer, seed)
    return clip.resolve(model, pretrained, grid, image_size, layer, seed)


def load_encoder(spec: EncoderSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The extractor of `spec` on `device`, in eval mode; its `dim` attribute is C."""
    family = {"clip": clip, "timm": timm_backbone, "hog": hog, "pixels": pixels}[spec.family]
    return family.load(spec, device)
