"""HOG grid features: histograms of oriented gradients, MaskFeat's target (Wei et al. 2022), no weights.

Per view: image gradients by a fixed 3x3 filter (Sobel, as MaskFeat; or central differences [-1, 0, 1], as
Dalal & Triggs and scikit-image) with reflected borders; each pixel votes its gradient magnitude into one of
`bins` unsigned orientation bins over [0, 180) degrees, measured from the image's x axis; votes are summed
per `cell` x `cell` pixel cell (averaged over the cell's area), optionally weighted by a Gaussian window
tiled every `window` pixels (MaskFeat: 16); each cell histogram is L2-normalised on its own (MaskFeat's
normalisation; scikit-image's with 1x1-cell blocks). A grid patch's feature is the histograms of its cells
concatenated in MaskFeat's order (channel and bin, then cell row, cell column): with MaskFeat's settings
(3 channels, 9 bins, 8-px cells in a 16-px patch) 108 values. (MaskFeat measures orientation from the y
axis, which puts its 20-degree bin edges half a bin from these; the histograms hold the same information.)

Channels: "each" keeps a histogram per RGB channel (MaskFeat); "max" takes, per pixel, the channel whose
gradient is largest (Dalal & Triggs, scikit-image's multichannel HOG). Pixels are read on the 0-255 scale.
Written in torch, so it runs where the images are, CPU or GPU; in the input's dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenkit.encoders.spec import EncoderSpec
from tokenkit.errors import ConfigError, require

GRADIENTS = ("sobel", "central")
CHANNELS = ("each", "max")
UNIT = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean, std: views.normalize gives k / 255, read back as k


@dataclass(frozen=True)
class HOGConfig:
    cell: int = 8  # pixels per cell side (MaskFeat: 8)
    bins: int = 9  # unsigned orientation bins over 180 degrees (MaskFeat: 9)
    gradient: str = "sobel"  # sobel (MaskFeat) | central (Dalal & Triggs, scikit-image)
    channels: str = "each"  # each: a histogram per RGB channel (MaskFeat) | max: the strongest channel
    window: int = 16  # Gaussian weighting tiled every `window` px, sd window / 2 (MaskFeat: 16); 0: off
    eps: float = 1e-5  # L2 normalisation: h / sqrt(|h|^2 + eps^2), as scikit-image

    def check_ranges(self) -> None:
        """The settings' own ranges, whatever the model (a bad --hog-* flag is refused even when unused)."""
        require(
            (
                ("--hog-cell", self.cell, 1 <= self.cell <= 512, "in [1, 512]"),
                ("--hog-bins", self.bins, 2 <= self.bins <= 360, "in [2, 360]"),
                ("--hog-window", self.window, 0 <= self.window <= 8192, "in [0, 8192] (0: off)"),
                ("--hog-eps", self.eps, 0 < self.eps <= 1e3, "in (0, 1e3]"),
                (
                    "--hog-gradient",
                    self.gradient,
                    self.gradient in GRADIENTS,
                    f"one of {', '.join(GRADIENTS)}",
                ),
                ("--hog-channels", self.channels, self.channels in CHANNELS, f"one of {', '.join(CHANNELS)}"),
            )
        )

    def validate(self, patch: int) -> None:
        self.check_ranges()
        if patch % self.cell:
            raise ConfigError(f"--hog-cell {self.cell}: must be a divisor of the {patch}-px patch")


def resolve(grid: int, image_size: int | None, cfg: HOGConfig) -> EncoderSpec:
    """The spec of a HOG extractor: 16-px patches unless --image-size says otherwise."""
    require((("--grid", grid, grid >= 1, ">= 1"),))
    size = grid * 16 if image_size is None else image_size
    if size < grid or size % grid:
        raise ConfigError(
            f"--image-size {size} with --grid {grid}: the grid must tile the image; pass --image-size "
            f"{grid * max(1, size // grid)}"
        )
    cfg.validate(size // grid)
    if cfg.window and size % cfg.window:
        raise ConfigError(f"--hog-window {cfg.window}: must divide --image-size {size} (or 0: off)")
    mean, std = UNIT
    options = tuple(sorted(asdict(cfg).items()))
    return EncoderSpec("hog", "hog", "none", "none", "hog", -1, size, grid, mean, std, 0, options)


def gaussian_window(size: int, dtype=torch.float64) -> torch.Tensor:
    """(size, size) Gaussian weights with sd size / 2, summing to 1 (MaskFeat's kernel)."""
    n = torch.arange(size, dtype=dtype)
    w = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    w2 = w[:, None] * w[None, :]
    return w2 / w2.sum()


class HOG(nn.Module):
    """(B, 3, S, S) views in [0, 1] (uint8 / 255, as views.normalize gives them with the spec's unit mean
    and std) -> (B, G*G, C) HOG features, C = channels x bins x (patch / cell)^2, in the input's dtype."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec, self.cfg = spec, HOGConfig(**dict(spec.options))
        d = [-1.0, 0.0, 1.0]
        kx = torch.tensor(
            [
                [v * w for v in d]
                for w in ([1.0, 2.0, 1.0] if self.cfg.gradient == "sobel" else [0.0, 1.0, 0.0])
            ]
        )
        self.register_buffer("kx", kx, persistent=False)  # (3, 3): d/dx, x to the right
        self.register_buffer("ky", kx.t().contiguous(), persistent=False)  # d/dy, y downwards
        width = 180.0 / self.cfg.bins
        self.register_buffer(
            "edges", torch.tensor([width * b for b in range(1, self.cfg.bins)]), persistent=False
        )
        win = self.cfg.window
        tiles = spec.image_size // win if win else 0
        self.register_buffer(
            "weight", gaussian_window(win).repeat(tiles, tiles) if win else torch.ones(1, 1), persistent=False
        )
        u = spec.patch // self.cfg.cell
        self.dim = (3 if self.cfg.channels == "each" else 1) * self.cfg.bins * u * u

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, G = self.cfg, self.spec.grid
        B, dt = x.shape[0], x.dtype
        x = torch.round(x * 255)  # the integer pixels again: equal pixels give exactly zero gradients
        xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(xp, self.kx.to(dt).expand(3, 1, 3, 3), groups=3)  # (B, 3, S, S)
        gy = F.conv2d(xp, self.ky.to(dt).expand(3, 1, 3, 3), groups=3)
        mag = torch.hypot(gx, gy)
        if cfg.channels == "max":  # per pixel, the channel of largest magnitude (the first on a tie)
            pick = mag.argmax(dim=1, keepdim=True)  # (B, 1, S, S)
            mag, gx, gy = (t.gather(1, pick) for t in (mag, gx, gy))
        deg = torch.rad2deg(torch.atan2(gy, gx)).remainder(180.0)  # [0, 180), unsigned orientation
        bin_of = torch.bucketize(
            deg.contiguous(), self.edges.to(dt), right=True
        )  # b where edge b-1 <= deg < edge b
        mag = mag * self.weight.to(dt)
        hist = torch.stack(  # (B, c, bins, S / cell, S / cell): mean vote per cell
            [F.avg_pool2d(mag * (bin_of == b), cfg.cell) for b in range(cfg.bins)], dim=2
        )
        hist = hist / torch.sqrt((hist**2).sum(dim=2, keepdim=True) + cfg.eps**2)
        u = self.spec.patch // cfg.cell
        c = hist.shape[1] * cfg.bins
        hist = hist.reshape(B, c, G, u, G, u).permute(0, 2, 4, 1, 3, 5)  # (B, G, G, c*bins, u, u)
        return hist.reshape(B, G * G, c * u * u)  # (B, G*G, C)


def load(spec: EncoderSpec, device: str | torch.device = "cpu") -> HOG:
    return HOG(spec).to(device)
