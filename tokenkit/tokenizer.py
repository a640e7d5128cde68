"""A k-CLIP tokenizer in Python: a codebook and the CLIP encoder it was fitted on, images in, token ids out.

    tok = Tokenizer.load("kclip-8192.safetensors", device="cuda")
    ids = tok.encode_image(Image.open("cat.jpg"))       # (G, G) int64: the central square, as `--view center`
    ids = tok(pixels)                                     # (B, G, G) from (B, S, S, 3) uint8 views

`tokenkit tokenize` runs this same computation on every view it stores, so ids from here equal the stored
tokens (same device and precision); online tokenization in another training loop, or a look at the tokens of
one image, need no token store.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from tokenkit.clip_encoder import EncoderSpec, GridEncoder, load_encoder
from tokenkit.codebook import Codebook
from tokenkit.errors import CodebookError
from tokenkit.images import to_rgb
from tokenkit.kmeans import assign
from tokenkit.loader import autocast, pick_device
from tokenkit.views import center_box, normalize, render_view, to_uint8


class Tokenizer:
    """Codebook + the CLIP encoder it names (tokenkit.clip_encoder.load_encoder, on the device to run on).
    `precision`: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16 or fp16."""

    def __init__(
        self, codebook: Codebook, encoder: GridEncoder, precision: str = "auto", name: str = "codebook"
    ):
        self.codebook, self.encoder, self.precision = codebook, encoder, precision
        self.device = next(encoder.parameters()).device
        autocast(self.device, precision)  # refuses an unknown precision now, not at the first batch
        if encoder.spec != codebook.encoder:  # the centroids describe that encoder's features only
            raise CodebookError(
                f"{name}: fitted on {codebook.encoder.model} ({codebook.encoder.weights_id}, layer "
                f"{codebook.encoder.layer}, {codebook.encoder.image_size} px), not on the encoder given; "
                "build the encoder from codebook.encoder"
            )
        if encoder.dim != codebook.dim:
            raise CodebookError(
                f"{name}: centroids have dim {codebook.dim} but {encoder.spec.model} gives {encoder.dim}-d "
                "features; use the codebook built from this model's features"
            )
        self.centroids = torch.from_numpy(codebook.centroids).to(self.device)  # (K, C)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> Tokenizer:
        """The tokenizer of a codebook file written by `tokenkit codebook` (its encoder is recorded in it)."""
        cb = Codebook.load(Path(path))
        return cls(cb, load_encoder(cb.encoder, pick_device(device)), precision, str(path))

    @property
    def spec(self) -> EncoderSpec:
        return self.codebook.encoder

    @property
    def grid(self) -> int:
        return self.spec.grid

    @property
    def image_size(self) -> int:
        """The side S of the views it reads."""
        return self.spec.image_size

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 views (S = image_size, as rendered by tokenkit.views) -> (B, G, G) int64 token
        ids on the tokenizer's device."""
        B, G = pixels.shape[0], self.grid
        if pixels.dtype != torch.uint8 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"pixels {tuple(pixels.shape)} {pixels.dtype}: expected (B, {self.image_size}, {self.image_size}, 3) "
                "uint8 views"
            )
        x = normalize(
            pixels.to(self.device, non_blocking=True), self.spec.mean, self.spec.std
        )  # (B, 3, S, S)
        with autocast(self.device, self.precision):
            f = self.encoder(x)  # (B, G*G, C)
        return assign(f.flatten(0, 1).float(), self.centroids, self.codebook.metric).view(B, G, G)

    def encode_image(self, img: Image.Image, view=None) -> torch.Tensor:
        """(G, G) int64 token ids of one image (as Image.open gives it: EXIF orientation, alpha and 16-bit
        modes handled as `tokenkit tokenize` does): its central square (`--view center`), or `view`, a
        stored (x, y, w, h, flip) row, rendered at image_size."""
        img = to_rgb(ImageOps.exif_transpose(img))
        view = (*center_box(img.width, img.height), 0) if view is None else view
        return self(to_uint8(render_view(img, view, self.image_size))[None])[0]
