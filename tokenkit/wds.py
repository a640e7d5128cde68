"""webdataset shards of the token cache: deterministic tar writing, a header-only index and a reader.

Each sample is two members sharing the key: `{key}.{ext}`, the original image bytes, and `{key}.tokens.npy`,
one numpy record (structured dtype, no pickle) with fields tokens (V, G, G) uint16|int32, views (V, 5)
int32 and label int64. One record member instead of three keeps the per-sample tar padding to two headers.
Tars are written with fixed mtime/owner so the same samples always give the same bytes. Beside each tar,
`shard-IIIIII.idx.npy` lists its samples' byte ranges (the tar's header-only index, saved once), so a
streaming reader that seeks to samples in shuffled order needs no walk over the tar's member headers.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from tokenkit.errors import SourceError, StoreError
from tokenkit.images import member_key
from tokenkit.journal import atomic_write_bytes

TOKENS_EXT = "tokens.npy"


def record_dtype(num_views: int, grid: int, token_dtype: str) -> np.dtype:
    return np.dtype(
        [("tokens", token_dtype, (num_views, grid, grid)), ("views", "<i4", (num_views, 5)), ("label", "<i8")]
    )


def pack_record(tokens: np.ndarray, views: np.ndarray, label: int) -> bytes:
    V, G, _ = tokens.shape
    rec = np.zeros((), dtype=record_dtype(V, G, tokens.dtype.str))
    rec["tokens"], rec["views"], rec["label"] = tokens, views, label
    buf = io.BytesIO()
    np.save(buf, rec, allow_pickle=False)
    return buf.getvalue()


def unpack_record(data: bytes, name: str = "<record>") -> dict:
    try:
        rec = np.load(io.BytesIO(data), allow_pickle=False)
        return {"tokens": rec["tokens"], "views": rec["views"], "label": int(rec["label"])}
    except (ValueError, OSError, KeyError) as e:
        raise StoreError(f"{name}: not a tokenkit token record ({e}); the shard is damaged") from e


def tar_bytes(members: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[int, int]]]:
    """A tar of (name, data) members with fixed metadata (identical input gives identical bytes), and each
    member's (offset, size) of its data in it."""
    buf, spans = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o644,
                0,
                0,
                "",
                "",
            )
            tf.addfile(info, io.BytesIO(data))
            # the data ends the archive so far, padded to whole 512-byte blocks
            spans.append((tf.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)))
    return buf.getvalue(), spans


def index_path(tar: Path | str) -> Path:
    """`wds/shard-IIIIII.tar` -> `wds/shard-IIIIII.idx.npy`, the sample index saved beside it."""
    tar = Path(tar)
    return tar.with_name(tar.name.removesuffix(".tar") + ".idx.npy")


def write_tar(path: Path, samples: list[dict]) -> Path:
    """samples: dicts with key, ext, data (image bytes), record (packed). Writes the tar, then its index
    (index_path), each atomically; returns the index's path."""
    members = []
    for s in samples:
        members.append((f"{s['key']}.{s['ext']}", s["data"]))
        members.append((f"{s['key']}.{TOKENS_EXT}", s["record"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    data, spans = tar_bytes(members)
    atomic_write_bytes(path, data)
    refs = [SampleRef(s["key"], s["ext"], spans[2 * i], spans[2 * i + 1]) for i, s in enumerate(samples)]
    buf = io.BytesIO()
    np.save(buf, index_array(refs), allow_pickle=False)
    atomic_write_bytes(index_path(path), buf.getvalue())
    return index_path(path)


class SampleRef(NamedTuple):
    """Where one sample of a token shard lies: its key, image extension and the two members' byte ranges."""

    key: str
    ext: str
    image: tuple[int, int]  # (offset, size) of the image bytes
    record: tuple[int, int]  # (offset, size) of the token record


def index_array(refs: list[SampleRef]) -> np.ndarray:
    """(n,) structured array of refs (what `.idx.npy` holds): key, ext, image / record offset and size."""
    out = np.zeros(
        len(refs),
        dtype=[
            ("key", f"<U{max((len(r.key) for r in refs), default=1)}"),
            ("ext", f"<U{max((len(r.ext) for r in refs), default=1)}"),
            ("image", "<i8", (2,)),
            ("record", "<i8", (2,)),
        ],
    )
    for i, r in enumerate(refs):
        out[i] = (r.key, r.ext, r.image, r.record)
    return out


def load_index(path: Path | str) -> list[SampleRef]:
    """The refs saved in a `.idx.npy` (index_array's inverse)."""
    try:
        a = np.load(path, allow_pickle=False)
        return [
            SampleRef(str(k), str(e), (int(i0), int(i1)), (int(r0), int(r1)))
            for k, e, (i0, i1), (r0, r1) in zip(
                a["key"], a["ext"], a["image"].tolist(), a["record"].tolist(), strict=True
            )
        ]
    except (ValueError, OSError, KeyError) as e:
        raise StoreError(
            f"{path}: not a tokenkit tar index ({e}); the shard is damaged, re-run tokenize"
        ) from e


def index_tar(path: Path | str, fileobj: BinaryIO | None = None) -> list[SampleRef]:
    """The samples of one token shard, in order, from its member headers alone (no payload is read).

    Members with absolute or '..' paths are refused; a key seen twice in the shard, or a sample lacking its
    image or its tokens, is an error. fileobj: the tar's bytes, when not read from path.
    """
    path = str(path)
    refs, seen, cur = [], set(), None

    def finish(c):
        if "record" not in c or "image" not in c:
            raise StoreError(
                f"{path}: sample '{c['key']}' lacks its image or its tokens; the shard is damaged"
            )
        refs.append(SampleRef(c["key"], c["ext"], c["image"], c["record"]))

    try:
        with tarfile.open(path, "r:", fileobj=fileobj) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = member_key(m.name, path)
                if cur is not None and cur["key"] != key:
                    finish(cur)
                    cur = None
                if cur is None:
                    if key in seen:
                        raise SourceError(
                            f"{path}: duplicate key '{key}'; the shard is damaged, re-run tokenize"
                        )
                    seen.add(key)
                    cur = {"key": key}
                if ext == TOKENS_EXT:
                    cur["record"] = (m.offset_data, m.size)
                else:
                    cur["ext"], cur["image"] = ext, (m.offset_data, m.size)
            if cur is not None:
                finish(cur)
    except tarfile.TarError as e:
        raise StoreError(
            f"{path}: truncated or not a tar ({e}); the shard is damaged, re-run tokenize"
        ) from e
    return refs


def read_sample(f: BinaryIO, path: str, ref: SampleRef) -> dict:
    """Sample {key, ext, data, tokens, views, label} at `ref` of the open shard file f."""
    out = {"key": ref.key, "ext": ref.ext}
    for what, (offset, size) in (("data", ref.image), ("record", ref.record)):
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise StoreError(
                f"{path}: truncated inside sample '{ref.key}'; the shard is damaged, re-run tokenize"
            )
        out[what] = data
    out.update(unpack_record(out.pop("record"), f"{path}:{ref.key}.{TOKENS_EXT}"))
    return out


def iter_tar(path: Path | str, refs: list[SampleRef] | None = None) -> Iterator[dict]:
    """Yield samples {key, ext, data, tokens, views, label} of one token shard, in order, at `refs` (default:
    index_tar's)."""
    refs = index_tar(path) if refs is None else refs
    with open(path, "rb") as f:
        for ref in refs:
            yield read_sample(f, str(path), ref)
