"""Raw pixels as grid features: each patch's RGB, average-pooled to `pool` x `pool` cells, no weights.

The simplest tokenizer k-means can be fitted on (a colour-and-layout palette of patches): the baseline a
learned or engineered feature has to beat. Views in [0, 1] (the spec's unit mean and std); C = 3 x pool^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenkit.encoders.spec import EncoderSpec
from tokenkit.errors import ConfigError, require


def resolve(grid: int, image_size: int | None, pool: int = 4) -> EncoderSpec:
    """The spec of a pixel extractor: 16-px patches unless --image-size says otherwise."""
    require((("--grid", grid, grid >= 1, ">= 1"),))
    size = grid * 16 if image_size is None else image_size
    if size < grid or size % grid or (size // grid) % pool:
        raise ConfigError(
            f"--image-size {size} with --grid {grid}: the grid must tile the image in patches of a multiple of "
            f"{pool} px; pass --image-size {grid * 16}"
        )
    unit = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return EncoderSpec(
        "pixels", "pixels", "none", "none", "pixels", -1, size, grid, *unit, 0, (("pool", pool),)
    )


class Pixels(nn.Module):
    """(B, 3, S, S) views in [0, 1] -> (B, G*G, 3 * pool^2) pooled patch pixels."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec, self.pool = spec, dict(spec.options)["pool"]
        self.dim = 3 * self.pool**2

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, p = self.spec.grid, self.pool
        y = F.adaptive_avg_pool2d(x, G * p)  # (B, 3, G*p, G*p): exact means, patches tile the image
        B = y.shape[0]
        y = y.reshape(B, 3, G, p, G, p).permute(0, 2, 4, 1, 3, 5)  # (B, G, G, 3, p, p)
        return y.reshape(B, G * G, self.dim)


def load(spec: EncoderSpec, device: str | torch.device = "cpu") -> Pixels:
    return Pixels(spec).to(device)
