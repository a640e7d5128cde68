"""Image sources (a folder or webdataset tar shards) and the one image decoder everything shares.

A source is listed once into a `SampleIndex`: for every sample a stable key, an integer label (-1 when
unlabelled) and a locator that reads its bytes back without scanning: a path relative to the folder, or
`tar_index:offset:size:ext` inside one of the listed tars. The index order is the sorted order of the source,
so every job and every rank sees the same rows.

`decode_image` is used by tokenize and by the trainer alike: the pixels a view is rendered from must be the
same in both, so there is exactly one decoder.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError

from tokenkit.errors import ImageError, SourceError
from tokenkit.remote import fetch, fetch_all, is_url

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
MAX_CLASSES = 2**20  # a .cls label beyond this is a damaged shard, not a class (label counts are arrays)
# Decompression bombs: Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse both.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


class StrArray(Sequence[str]):
    """A read-only sequence of strings packed in one UTF-8 buffer with offsets (two numpy arrays), which
    forked DataLoader workers share. In a list or tuple, every str is an object whose reference count changes
    when it is read, so each worker copies the pages it reads: for ImageNet's 1.28M keys and paths, 200.9 MiB
    per worker over an epoch, 0.5 MiB as a StrArray (bench/worker_memory.py, docs/benchmarks.md)."""

    def __init__(self, items: Iterable[str]):
        data = [s.encode() for s in items]
        self._offsets = np.zeros(len(data) + 1, np.int64)
        np.cumsum([len(b) for b in data], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(data), np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        i %= n
        return self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()

    def __iter__(self) -> Iterator[str]:
        raw, off = self._buf.tobytes(), self._offsets.tolist()
        return (raw[a:b].decode() for a, b in zip(off[:-1], off[1:], strict=True))

    def __eq__(self, other) -> bool:
        if isinstance(other, StrArray):
            return np.array_equal(self._offsets, other._offsets) and np.array_equal(self._buf, other._buf)
        return isinstance(other, (list, tuple)) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"StrArray({len(self)} strings)"


@dataclass(frozen=True)
class SampleIndex:
    """The listed samples of a source. `root` is the folder, or `tars` the shards (absolute paths, or URLs
    read through the shard cache: tokenkit.remote). Keys and
    locators are StrArrays: shared, not copied, by forked loader workers."""

    kind: str  # "folder" | "tars"
    root: str
    tars: tuple[str, ...]
    keys: StrArray
    labels: np.ndarray  # (R,) int64, -1 = unlabelled
    locators: StrArray
    classes: tuple[str, ...] = field(default=())
    unlisted: tuple[tuple[str, str], ...] = field(default=())  # (name, why) of files the listing skipped

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> dict:
        """What a resumed job must find unchanged: the kind, the count and a hash of keys and locators."""
        import hashlib

        h = hashlib.sha256()
        for k, loc in zip(self.keys, self.locators, strict=True):
            h.update(f"{k}\0{loc}\n".encode())
        return {"kind": self.kind, "n": len(self.keys), "sha256": h.hexdigest()}

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root, "tars": list(self.tars), "classes": list(self.classes)}

    def read_bytes(self, i: int) -> bytes:
        return read_locator(self.kind, self.root, self.tars, self.locators[i])

    def where(self, i: int) -> str:
        """Sample i's location for messages: its file, or its tar shard and key."""
        if self.kind == "folder":
            return str(Path(self.root) / self.locators[i])
        return f"{self.tars[int(self.locators[i].split(':')[0])]}:{self.keys[i]}"

    def ext(self, i: int) -> str:
        """The image's file extension (lower case, no dot), as stored in webdataset output."""
        loc = self.locators[i]
        return (loc.rsplit(".", 1)[-1] if self.kind == "folder" else loc.rsplit(":", 1)[-1]).lower()


def read_locator(kind: str, root: str, tars: tuple[str, ...] | list[str], locator: str) -> bytes:
    if kind == "folder":
        return (Path(root) / locator).read_bytes()
    t, offset, size = (int(x) for x in locator.split(":")[:3])
    with open(
        fetch(tars[t]) if is_url(tars[t]) else tars[t], "rb"
    ) as f:  # a URL: its cached copy, fetched once
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ImageError(f"{tars[t]}: member at offset {offset} is truncated; re-create the shard")
    return data


def sanitize_key(stem: str) -> str:
    """webdataset groups members by the basename up to its first dot: dots in a key would split a sample."""
    head, _, base = stem.rpartition("/")
    base = base.replace(".", "_")
    return f"{head}/{base}" if head else base


def member_key(name: str, where: str) -> tuple[str, str]:
    """A tar member's (key, extension), webdataset-style: the path up to the basename's first dot, and the
    rest. Absolute and '..' paths are refused: the archive is hostile."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise SourceError(
            f"{where}: member '{name}' has an absolute or '..' path; the archive is hostile, remove it"
        )
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def image_files(root: str) -> tuple[list[str], list[str]]:
    """(image paths under root, relative, '/'-separated, sorted; names skipped). Hidden files and folders
    (a leading '.': .ipynb_checkpoints, .thumbs, ...) are left out; symlinked files and folders are followed,
    broken links skipped, and a folder met again through a link (a loop) is read once. One scandir per folder
    and no stat per file (the directory entry's type), so ImageNet's 1.28M files list in seconds. A name that
    is not valid UTF-8 cannot be a sample key: it is skipped and returned in the second list (escaped)."""
    out, skipped, stack = [], [], [""]
    seen = {os.stat(root).st_ino}
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                path = f"{rel}/{e.name}" if rel else e.name
                try:
                    is_dir = e.is_dir()
                except OSError:  # a link to itself (ELOOP): skipped, as broken links are
                    continue
                if is_dir:
                    try:
                        ino = e.stat().st_ino  # follows the link: a loop is the same folder again
                    except OSError:
                        continue
                    if ino not in seen:
                        seen.add(ino)
                        stack.append(path)
                elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS:
                    try:
                        path.encode()
                    except UnicodeEncodeError:
                        skipped.append(
                            path.encode(errors="surrogateescape").decode(errors="backslashreplace")
                        )
                        continue
                    out.append(path)
    return sorted(out), sorted(skipped)


def list_folder(root: Path) -> SampleIndex:
    root = Path(root).resolve()
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder; pass an image folder or tar shards")
    files, bad_names = image_files(str(root))
    if not files:
        raise SourceError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) found; pass a folder of images")
    # class sub-folders give integer labels only when every image sits in one
    labelled = all("/" in f for f in files)
    stray = [f for f in files if "/" not in f]
    if not labelled and len(stray) < len(files):
        raise SourceError(
            f"{root}: '{stray[0]}' ({len(stray)} images in all) sits beside the class folders "
            f"({', '.join(sorted({f.split('/', 1)[0] for f in files if '/' in f})[:3])}, ...), which would leave "
            "every image unlabelled; move it into a class folder or out of this one"
        )
    classes = tuple(sorted({f.split("/", 1)[0] for f in files})) if labelled else ()
    cls_idx = {c: i for i, c in enumerate(classes)}
    keys, labels, seen = [], [], {}
    for f in files:
        key = sanitize_key(f.rsplit(".", 1)[0])
        if key in seen:
            raise SourceError(
                f"{root}: '{f}' and '{seen[key]}' map to the same key '{key}'; rename one of them"
            )
        seen[key] = f
        keys.append(key)
        labels.append(cls_idx[f.split("/", 1)[0]] if labelled else -1)
    return SampleIndex(
        "folder",
        str(root),
        (),
        StrArray(keys),
        np.asarray(labels, dtype=np.int64),
        StrArray(files),
        classes,
        tuple((name, "file name is not valid UTF-8; rename it") for name in bad_names),
    )


def expand_tars(spec: str) -> list[str]:
    """The tars of a path or brace pattern: absolute local paths, or URLs as given (tokenkit.remote)."""
    if is_url(spec):
        return list(braceexpand(spec))
    paths = [str(Path(p).resolve()) for p in braceexpand(spec)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SourceError(
            f"{missing[0]}: tar shard not found ({len(missing)} missing); check the path or pattern"
        )
    return paths


def list_tars(spec: str) -> SampleIndex:
    """List webdataset shards: members grouped by key (path up to the basename's first dot).

    The image is the member with an image extension; `cls` (a decimal integer) gives the label.
    """
    tars = expand_tars(spec)
    keys, labels, locators, seen = [], [], [], {}
    local = fetch_all(tars) if is_url(spec) else tars  # a URL's shard is read from its cached copy
    for t, path in enumerate(local):
        name = tars[t]  # the shard as the user named it, in messages
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = member_key(m.name, name)
                    if not ext:
                        continue
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    if ext in groups[key]:
                        raise SourceError(f"{name}: duplicate member '{m.name}' (key '{key}'); fix the shard")
                    groups[key][ext.lower()] = m
                cls_vals = {}
                for key in order:
                    if "cls" in groups[key]:
                        m = groups[key]["cls"]
                        raw = tf.extractfile(m).read().decode().strip()
                        try:
                            cls_vals[key] = int(raw)
                        except ValueError as e:
                            raise SourceError(
                                f"{name}: '{m.name}' holds '{raw[:40]}', not an integer label"
                            ) from e
                        if not 0 <= cls_vals[key] < MAX_CLASSES:  # labels index arrays: bounded, not negative
                            raise SourceError(
                                f"{name}: '{m.name}' holds label {raw[:40]}; labels must be in [0, {MAX_CLASSES}), "
                                "fix the shard"
                            )
        except tarfile.TarError as e:
            raise SourceError(f"{name}: not a readable tar ({e}); re-create the shard") from e
        for key in order:
            img = next((m for e, m in groups[key].items() if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
            if img is None:
                continue
            if key.lower() in seen:
                other, where = seen[key.lower()]
                what = "also appears" if other == key else f"differs only in case from '{other}'"
                raise SourceError(
                    f"{name}: key '{key}' {what} in {where}; keys must be unique (also on case-insensitive file "
                    "systems): rename one"
                )
            seen[key.lower()] = (key, name)
            keys.append(key)
            labels.append(cls_vals.get(key, -1))
            locators.append(f"{t}:{img.offset_data}:{img.size}:{img.name.rsplit('.', 1)[-1].lower()}")
    if not keys:
        raise SourceError(f"{spec}: the shards hold no images; pass webdataset shards with image members")
    n_cls = max(labels) + 1 if max(labels) >= 0 else 0
    return SampleIndex(
        "tars",
        "",
        tuple(tars),
        StrArray(keys),
        np.asarray(labels, dtype=np.int64),
        StrArray(locators),
        tuple(str(i) for i in range(n_cls)),
    )


def list_source(spec: str | Path) -> SampleIndex:
    """A folder path, or one tar path / brace pattern of tar paths, local or URLs (tokenkit.remote)."""
    s = str(spec)
    if s.endswith(".tar") or "{" in s or is_url(s):
        return list_tars(s)
    return list_folder(Path(s))


def source_from_manifest(desc: dict, keys, labels, locators) -> SampleIndex:
    return SampleIndex(
        desc["kind"],
        desc["root"],
        tuple(desc["tars"]),
        StrArray(keys),
        np.asarray(labels),
        StrArray(locators),
        tuple(desc.get("classes", ())),
    )


def decode_image(data: bytes, name: str = "<bytes>", min_side: int = 1) -> Image.Image:
    """Decode image bytes into an RGB PIL image, the same way everywhere.

    EXIF orientation is applied; 16-bit and 32-bit grey are scaled (not clipped) to 8 bits; palette and
    alpha images are composited over white; CMYK is converted by Pillow. Images larger than Pillow's
    decompression-bomb limit, or with a side below `min_side`, raise ImageError.
    """
    if not data:
        raise ImageError(f"{name}: empty file; remove it or re-download it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{name}: {img.width}x{img.height} pixels exceeds the decompression-bomb limit"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except UnidentifiedImageError as e:  # its message names a BytesIO object, not the file
        raise ImageError(
            f"{name}: not a usable image (no image format Pillow reads); remove or replace the file"
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: not a usable image ({e}); remove or replace the file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: truncated or corrupt image ({e}); remove or replace the file") from e
    try:
        img = to_rgb(img)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from e
    if min(img.size) < min_side:
        raise ImageError(
            f"{name}: {img.width}x{img.height} is smaller than the {min_side}-pixel minimum side"
        )
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB. Wide grey modes are scaled by their real range: 16-bit by 65535; 32-bit
    integers holding 8- or 16-bit values by 255 or 65535; floats in [0, 1] by 1 and in [0, 255] by 255.
    Values outside those ranges (negative, or above 65535) have no scale to read them by: refused."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 65535:
            raise ImageError(
                f"{img.mode}-mode image with values in [{lo:g}, {hi:g}]: no 8-, 16-bit or [0, 1] range to scale it "
                "by; convert it to 8-bit"
            )
        elif img.mode == "F" and hi <= 1:
            top = 1.0
        else:
            top = 255.0 if hi <= 255 else 65535.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img
