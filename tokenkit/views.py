"""Geometric views: a crop box in source pixels plus a flip flag, and the one function that renders them.

A view is stored as 5 int32 values `(x, y, w, h, flip)`: the box's left, top, width, height in the decoded
source image, and 1 when the crop is mirrored left-right. Views are drawn from a generator seeded by
(seed, sample key), so they do not depend on batch size, rank or order. `render_view` is shared by
tokenize and the trainer: the student sees exactly the pixels the tokens were computed from.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ViewConfig:
    """How the V views of each image are drawn (torchvision RandomResizedCrop semantics)."""

    views: int = 1
    mode: str = "center"  # "center": the central square (the paper); "random": RandomResizedCrop boxes
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    flip: float = 0.5
    seed: int = 0


def keyed_rng(*parts) -> np.random.Generator:
    """A generator keyed by its parts, e.g. (seed, sample key): the same draws on any machine, rank or batch
    order. Used for views, kept feature patches, and every random draw of the trainer."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def random_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: 10 tries at a random area and log-uniform aspect ratio, then a fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draw_views(cfg: ViewConfig, key: str, width: int, height: int) -> np.ndarray:
    """The V views of one image. Returns (V, 5) int32 rows (x, y, w, h, flip)."""
    out = np.zeros((cfg.views, 5), dtype=np.int32)
    if cfg.mode == "center":
        out[:, :4] = center_box(width, height)
        return out
    rng = keyed_rng(cfg.seed, key)
    for v in range(cfg.views):
        out[v, :4] = random_box(rng, width, height, cfg.scale, cfg.ratio)
        out[v, 4] = int(rng.uniform() < cfg.flip)
    return out


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def render_view(img: Image.Image, view, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Crop `view`'s box out of the RGB image, resize it to size x size (bicubic, or a tokenizer's own
    interpolation), mirror it if flagged. Cropped first, as torchvision's resized_crop (timm's and BEiT's
    RandomResizedCrop) does it: a resize of the box alone would also read the pixels just outside it."""
    x, y, w, h, flip = (int(v) for v in view)
    out = img.crop((x, y, x + w, y + h)).resize((size, size), RESAMPLE[interpolation])
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (S, S, 3) uint8: what DataLoader workers ship (4x fewer bytes than float32)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [0, 1], on pixels' device."""
    return pixels.permute(0, 3, 1, 2).float().div_(255)


def standardize(a: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, S, S) float32 in [0, 1] -> normalised with per-channel mean/std, in place."""
    m = torch.tensor(mean, dtype=torch.float32, device=a.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=a.device).view(1, 3, 1, 1)
    return a.sub_(m).div_(s)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised with per-channel mean/std, on pixels' device."""
    return standardize(to_unit(pixels), mean, std)


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """PIL RGB -> (3, S, S) float32 normalised with per-channel mean/std."""
    return normalize(to_uint8(img)[None], mean, std)[0]
