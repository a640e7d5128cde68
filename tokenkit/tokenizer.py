"""The tokenizer contract: views in, token ids out, for every family.

    tok = load_tokenizer("kclip-8192.safetensors", device="cuda")   # a codebook, or a converted quantizer
    ids = tok.encode_image(Image.open("cat.jpg"))       # (G, G) int64: the central square, as `--view center`
    ids = tok(pixels)                                     # (B, G, G) from (B, S, S, 3) uint8 views

Two kinds meet it. A codebook (`tokenkit codebook`) pairs a grid feature extractor (CLIP, timm, HOG) with
k-means centroids: each patch's token is its feature's nearest centroid. A quantizer (`tokenkit convert`) is
a code model that yields ids itself (VQ-KD, DALL-E). Each has an `identity` (a dict of everything that
changes a token: family, model, weights sha256, settings), and `id`, its sha256: what a token store records
and the trainer compares. `tokenkit tokenize` runs this same computation on every view it stores, so ids
from here equal the stored tokens (same device and precision).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image, ImageOps

from tokenkit.codebook import Codebook
from tokenkit.device import autocast, pick_device
from tokenkit.encoders import load_encoder
from tokenkit.errors import CodebookError
from tokenkit.images import to_rgb
from tokenkit.kmeans import assign
from tokenkit.quantizer import Quantizer, read_header
from tokenkit.views import center_box, normalize, render_view, to_uint8, to_unit


def identity_id(identity: dict) -> str:
    """The sha256 of a tokenizer identity, as canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class Tokenizer:
    """What every tokenizer has: identity, K, grid G, the view side S and its interpolation, a device; each
    kind below adds `ids`: (B, S, S, 3) uint8 on the device -> (B, G*G) int64 ids."""

    identity: dict
    k: int
    grid: int
    image_size: int
    interpolation: str  # how views are resized to S: "bicubic", or "lanczos" (BEiT's DALL-E view)
    device: torch.device

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        autocast(device, precision)  # refuses an unknown precision now, not at the first batch

    @property
    def id(self) -> str:
        return identity_id(self.identity)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 views (S = image_size, as rendered by tokenkit.views) -> (B, G, G) int64 token
        ids on the tokenizer's device."""
        S, G = self.image_size, self.grid
        if pixels.dtype != torch.uint8 or pixels.shape[1:] != (S, S, 3):
            raise ValueError(
                f"pixels {tuple(pixels.shape)} {pixels.dtype}: expected (B, {S}, {S}, 3) uint8 views"
            )
        return self.ids(pixels.to(self.device, non_blocking=True)).view(-1, G, G)

    def encode_image(self, img: Image.Image, view=None) -> torch.Tensor:
        """(G, G) int64 token ids of one image (as Image.open gives it: EXIF orientation, alpha and 16-bit
        modes handled as `tokenkit tokenize` does): its central square (`--view center`), or `view`, a
        stored (x, y, w, h, flip) row, rendered at image_size."""
        img = to_rgb(ImageOps.exif_transpose(img))
        view = (*center_box(img.width, img.height), 0) if view is None else view
        return self(to_uint8(render_view(img, view, self.image_size, self.interpolation))[None])[0]


class CodebookTokenizer(Tokenizer):
    """A grid feature extractor + k-means centroids: each patch's token is its nearest centroid."""

    interpolation = "bicubic"

    def __init__(
        self,
        codebook: Codebook,
        device: torch.device,
        precision: str = "auto",
        name: str = "codebook",
        encoder: torch.nn.Module | None = None,
    ):
        """encoder: the extractor to use instead of building the codebook's (a benchmark's, its weights
        copied from a reference); it must compute the codebook spec's features."""
        super().__init__(device, precision)
        self.codebook, self.spec = codebook, codebook.encoder
        self.encoder = load_encoder(self.spec, device) if encoder is None else encoder
        if self.encoder.dim != codebook.dim:
            raise CodebookError(
                f"{name}: centroids have dim {codebook.dim} but {self.spec.model} gives {self.encoder.dim}-d features; "
                "use the codebook built from this model's features"
            )
        self.k, self.grid, self.image_size = codebook.k, self.spec.grid, self.spec.image_size
        self.identity = codebook.identity()
        self.centroids = torch.from_numpy(codebook.centroids).to(device)  # (K, C)

    def ids(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels, self.spec.mean, self.spec.std)  # (B, 3, S, S)
        with autocast(self.device, self.precision):
            f = self.encoder(x)  # (B, G*G, C)
        return assign(f.flatten(0, 1).float(), self.centroids, self.codebook.metric).view(len(x), -1)


class QuantizerTokenizer(Tokenizer):
    """A code model that yields the ids itself (VQ-KD, DALL-E dVAE)."""

    def __init__(self, quantizer: Quantizer, device: torch.device, precision: str = "auto"):
        super().__init__(device, precision)
        self.quantizer, self.net = quantizer, quantizer.build(device)
        self.k, self.grid, self.image_size = quantizer.k, quantizer.grid, quantizer.image_size
        self.interpolation = quantizer.interpolation
        self.identity = quantizer.identity()

    def ids(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.quantizer.preprocess(to_unit(pixels))  # (B, 3, S, S)
        with autocast(self.device, self.precision):
            return self.net(x)  # (B, G*G)


def load_tokenizer(path: str | Path, device: str = "auto", precision: str = "auto") -> Tokenizer:
    """The tokenizer of a codebook file (`tokenkit codebook`) or a quantizer file (`tokenkit convert`)."""
    path, dev = Path(path), pick_device(device)
    kind = read_header(path).get("kind")
    if kind == "codebook":
        return CodebookTokenizer(Codebook.load(path), dev, precision, str(path))
    if kind == "quantizer":
        return QuantizerTokenizer(Quantizer.load(path), dev, precision)
    raise CodebookError(f"{path}: a tokenkit '{kind}' file, not a codebook or quantizer")


def file_identity(path: str | Path) -> dict:
    """The identity of the tokenizer in a codebook or quantizer file, its tensors checked, no model built."""
    path = Path(path)
    kind = read_header(path).get("kind")
    if kind == "codebook":
        return Codebook.load(path).identity()
    if kind == "quantizer":
        return Quantizer.load(path).identity()
    raise CodebookError(f"{path}: a tokenkit '{kind}' file, not a codebook or quantizer")


def weights_note(weights_id: str) -> str:
    """A feature extractor's weights in a few words: a random init says so (its tokens mean little)."""
    if weights_id.startswith("none:seed="):
        return f"random-init weights, seed {weights_id.removeprefix('none:seed=')}"
    if weights_id.startswith("sha256:"):
        return f"weights {weights_id[: len('sha256:') + 16]}"
    return "no weights" if weights_id == "none" else f"{weights_id} weights"


def describe(identity: dict) -> str:
    """One line naming a tokenizer from its identity, as `inspect` prints it."""
    if identity["kind"] == "quantizer":
        cfg = identity["config"]
        return f"{identity['family']} quantizer, {cfg['image_size']} px, weights {identity['weights_sha256'][:16]}"
    enc = identity["encoder"]
    if enc["family"] == "hog":
        o = enc["options"]
        what = f"HOG ({o['bins']} bins, {o['cell']}-px cells, {o['gradient']}, channels {o['channels']})"
    elif enc["family"] == "pixels":
        what = f"pixels (RGB pooled to {enc['options']['pool']}x{enc['options']['pool']} per patch)"
    else:
        layer = f", layer {enc['layer']}" if enc["layer"] >= 0 else ""
        what = f"{enc['family']} {enc['model']} ({weights_note(enc['weights_id'])}{layer})"
    return f"k-means ({identity['metric']}) over {what} at {enc['image_size']} px"
