"""Token maps drawn over their views, as a PNG: `tokenkit show` (a stored image, each stored view; or a
gallery of the patches given one code) and `tokenkit encode --out` (any image under a tokenizer, its
central square)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tokenkit.errors import StoreError
from tokenkit.images import decode_image
from tokenkit.store import TokenStore
from tokenkit.views import render_view
from tokenkit.wds import load_index, read_sample


def code_color(code: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per token id (the same id is the same colour in every picture)."""
    h = hashlib.blake2b(int(code).to_bytes(4, "little"), digest_size=3).digest()
    return tuple(64 + b % 192 for b in h)


def token_overlay(
    view_img: Image.Image, tokens: np.ndarray, alpha: float = 0.45, labels: bool = True
) -> Image.Image:
    """view_img (S, S) RGB, tokens (G, G) -> the view with one coloured, labelled cell per token."""
    G = tokens.shape[0]
    S = view_img.width
    cell = S / G
    layer = Image.new("RGB", view_img.size)
    draw = ImageDraw.Draw(layer)
    for r in range(G):
        for c in range(G):
            box = (round(c * cell), round(r * cell), round((c + 1) * cell) - 1, round((r + 1) * cell) - 1)
            draw.rectangle(box, fill=code_color(tokens[r, c]))
    out = Image.blend(view_img, layer, alpha)
    if labels and cell >= 18:
        d = ImageDraw.Draw(out)
        for r in range(G):
            for c in range(G):
                d.text((c * cell + 2, r * cell + 2), str(int(tokens[r, c])), fill=(0, 0, 0))
    return out


def show(store: TokenStore, key: str, out: Path, size: int = 224, source_root: str | None = None) -> Path:
    """Write a PNG: for each stored view of `key`, the rendered view and the view with its tokens.

    Reads the zarr arrays and the recorded source when the store has them, else finds the key in its
    webdataset shards' indexes and reads that one sample (the shards carry the image bytes)."""
    if store.has_zarr:
        pos = store.index_of(key)
        sample = store.read([pos])
        img = store.image(pos, source_root)
        views, tokens = sample["views"][0], sample["tokens"][0]  # (V, 5), (V, G, G)
    else:
        found = None
        for tar, index in zip(store.tar_paths(), store.tar_indexes(), strict=True):
            ref = next((r for r in load_index(index) if r.key == key), None)
            if ref is not None:
                with open(tar, "rb") as f:
                    found = read_sample(f, str(tar), ref)
                break
        if found is None:
            raise StoreError(f"{store.root}: no stored sample with key '{key}'")
        img = decode_image(found["data"], key)
        views, tokens = found["views"], found["tokens"]
    return save_sheet(img, views, tokens, out, size)


def save_sheet(img: Image.Image, views: np.ndarray, tokens: np.ndarray, out: Path, size: int = 224) -> Path:
    """Write a PNG with one row per view: the view rendered at size x size, and beside it the same view with
    its token map. views (V, 5) rows (x, y, w, h, flip); tokens (V, G, G)."""
    V = len(views)
    sheet = Image.new("RGB", (2 * size + 12, V * (size + 6) + 6), (255, 255, 255))
    for v in range(V):
        view = render_view(img, views[v], size)
        y = 6 + v * (size + 6)
        sheet.paste(view, (4, y))
        sheet.paste(token_overlay(view, tokens[v]), (size + 8, y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def find_code(store: TokenStore, code: int, limit: int) -> list[tuple[int, int, int, int]]:
    """Up to `limit` places (sample position, view, row, column) whose token is `code`, in store order,
    at most one per view so the gallery shows many images."""
    found = []
    pos = 0
    for tokens, _, _ in store.blocks():
        b, V, G, _ = tokens.shape
        for i, v in zip(*np.nonzero((tokens == code).any(axis=(2, 3))), strict=True):
            r, c = np.argwhere(tokens[i, v] == code)[0]
            found.append((pos + int(i), int(v), int(r), int(c)))
            if len(found) == limit:
                return found
        pos += b
    return found


def sample_image(
    store: TokenStore, position: int, source_root: str | None = None
) -> tuple[Image.Image, np.ndarray]:
    """The source image and stored views (V, 5) of the sample at `position` (zarr: read from the recorded
    source, checked against its crc32; webdataset: from its shard)."""
    if store.has_zarr:
        return store.image(position, source_root), store.read([position])["views"][0]
    seen = 0
    for tar, index in zip(store.tar_paths(), store.tar_indexes(), strict=True):
        refs = load_index(index)
        if position < seen + len(refs):
            with open(tar, "rb") as f:
                s = read_sample(f, str(tar), refs[position - seen])
            return decode_image(s["data"], s["key"]), s["views"]
        seen += len(refs)
    raise StoreError(f"{store.root}: no sample at position {position}")


def code_gallery(
    store: TokenStore, code: int, out: Path, limit: int = 64, size: int = 64, source_root: str | None = None
) -> tuple[Path, int]:
    """Write a PNG of up to `limit` patches whose token is `code` (each cropped from its stored view, with
    a margin of half a patch around it, the patch itself framed), 8 to a row. Returns (path, patches)."""
    if not 0 <= code < store.k:
        raise StoreError(
            f"--code {code}: the store's tokenizer has K={store.k}; pass a code in [0, {store.k - 1}]"
        )
    places = find_code(store, code, limit)
    if not places:
        raise StoreError(
            f"{store.root}: no stored token has code {code}; pick one that `inspect` shows as used"
        )
    G, cols = store.grid, 8
    rows = math.ceil(len(places) / cols)
    sheet = Image.new("RGB", (cols * (size + 4) + 4, rows * (size + 4) + 4), (255, 255, 255))
    for n, (pos, v, r, c) in enumerate(places):
        img, views = sample_image(store, pos, source_root)
        cell = size / 2  # the patch's side in the picture: the crop is two patches wide
        view = render_view(img, views[v], round(G * cell))
        x0, y0 = round((c - 0.5) * cell), round((r - 0.5) * cell)
        crop = view.crop((x0, y0, x0 + size, y0 + size))  # past the view's edge: black
        ImageDraw.Draw(crop).rectangle(
            (size // 4, size // 4, size - size // 4 - 1, size - size // 4 - 1), outline=(255, 64, 64)
        )
        sheet.paste(crop, (4 + (n % cols) * (size + 4), 4 + (n // cols) * (size + 4)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, len(places)
