"""Row-sharded zarr v3 arrays: the layout shared by feature stores and token stores.

Every array of a store has the source's N samples as rows (axis 0), in the source's order. Rows are grouped
in zarr shards of `shard_size` rows, which are also the work shards of the job: one shard is computed and
written in one call, so every write is shard-aligned and a shard file is always written whole. A `status`
array marks rows whose image was skipped (1) instead of stored (0); skipped rows hold the fill value.

The manifest records each shard file's sha256 so `verify` can find a flipped byte, a truncated or a
missing shard. The shard file of array `name` for shard i is `name/c/i/0/...` (default key encoding).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from tokenkit.errors import StoreError
from tokenkit.journal import check_format_version, read_json, sha256_file
from tokenkit.remote import is_url, mirror_store

CHUNK_ROWS = 64  # rows per inner chunk: the unit a random read decodes
STATUS_OK, STATUS_SKIPPED = 0, 1
STATUS_UNWRITTEN = 255  # the status fill value: a written shard never equals it, so its file always exists


def create_arrays(
    root: Path, n: int, shard_size: int, arrays: dict[str, tuple[tuple[int, ...], str]]
) -> None:
    """Create the zarr group at `root` with arrays name -> (per-row shape, dtype), all with n rows."""
    g = zarr.open_group(str(root), mode="a", zarr_format=3)
    for name, (tail, dtype) in arrays.items():
        inner = min(CHUNK_ROWS, shard_size)
        while shard_size % inner:
            inner -= 1  # zarr needs inner chunks that tile the shard
        is_str = dtype == "str"
        g.create_array(
            name,
            shape=(n, *tail),
            dtype=str if is_str else dtype,
            chunks=(inner, *tail),
            shards=(shard_size, *tail),
            compressors="auto" if is_str else (None if dtype.startswith("float") else ZstdCodec(level=3)),
            fill_value="" if is_str else (STATUS_UNWRITTEN if name == "status" else 0),
            chunk_key_encoding={"name": "default", "separator": "/"},
            overwrite=True,
        )


def shard_file(name: str, ndim: int, shard: int) -> str:
    return "/".join([name, "c", str(shard)] + ["0"] * (ndim - 1))


def write_shard(root: Path, shard: int, start: int, data: dict[str, np.ndarray]) -> dict[str, str]:
    """Write rows [start, start + len) of every array in `data` (one whole zarr shard each), fsync them.

    Returns {shard file path relative to root: sha256}.
    """
    sums = {}
    for name, rows in data.items():
        a = zarr.open_array(str(root / name), mode="r+")
        assert a.shards[0] * shard == start, f"{name}: write at row {start} is not aligned to shard {shard}"
        a[start : start + len(rows)] = rows
        rel = shard_file(name, a.ndim, shard)
        if not (root / rel).exists():
            # zarr's sharding codec stores no file for a shard that is all fill value (e.g. every image of
            # the shard skipped), whatever write_empty_chunks says; the manifest records that as None
            sums[rel] = None
            continue
        fd = os.open(root / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sums[rel] = sha256_file(root / rel)
    return sums


class RowStore:
    """A complete store opened for reading: its manifest and its zarr arrays."""

    kind = ""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        has_zarr = "zarr" in manifest.get("formats", ["zarr"])  # feature stores are always zarr
        self.group = zarr.open_group(str(self.root), mode="r") if has_zarr else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "group": None}  # a DataLoader worker reopens the zarr group

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "zarr" in self.manifest.get("formats", ["zarr"]):
            self.group = zarr.open_group(str(self.root), mode="r")

    @classmethod
    def open(cls, root: Path | str):
        """The store at `root`: a folder, or a URL mirrored read-only first (tokenkit.remote.mirror_store)."""
        root = mirror_store(root) if isinstance(root, str) and is_url(root) else Path(root)
        mpath = root / "manifest.json"
        if not mpath.exists():
            if (root / "_job.json").exists():
                raise StoreError(
                    f"{root}: the job that writes this store has not finished; re-run it with --resume"
                )
            if (root.parent / "manifest.json").exists():  # a folder inside a store, e.g. STORE/wds
                raise StoreError(f"{root}: a folder inside the store {root.parent}; pass the store")
            raise StoreError(f"{root}: no manifest.json; not a tokenkit {cls.kind} store")
        manifest = read_json(mpath)
        check_format_version(root, manifest, cls.kind)
        return cls(root, manifest)

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def shard_files(self, select=None) -> list[tuple[int, str, str | None]]:
        """(shard number, path relative to the store, recorded sha256 or None for an absent file) of every
        shard file, or of those whose relative path `select(rel)` accepts."""
        return [
            (i, rel, want)
            for i, shard in enumerate(self.manifest["shards"])
            for rel, want in sorted(shard["sha256"].items())
            if select is None or select(rel)
        ]

    def file_stats(self, select=None) -> dict[str, list[int]]:
        """{relative path: [size, mtime_ns]} of the (selected) shard files present: what changes when a file is
        rewritten, so a job that verified them can tell whether it must hash them again."""
        out = {}
        for _, rel, _ in self.shard_files(select):
            p = self.root / rel
            if p.exists():
                st = p.stat()
                out[rel] = [st.st_size, st.st_mtime_ns]
        return out

    def verify_files(self, select=None, rank: int = 0, world: int = 1) -> list[str]:
        """Recompute the sha256 of every shard file (or of those `select(rel)` accepts; of shards i with
        i % world == rank only, when ranks share the work). Returns one message per bad shard."""
        problems = []
        for i, rel, want in self.shard_files(select):
            if i % world != rank:
                continue
            p = self.root / rel
            if want is None:
                if p.exists():
                    problems.append(
                        f"{p}: shard {i} should be absent (all fill value) but exists; the store is damaged"
                    )
            elif not p.exists():
                problems.append(f"{p}: shard {i} is missing; re-run the job into a new folder")
            elif sha256_file(p) != want:
                problems.append(
                    f"{p}: shard {i} sha256 mismatch (flipped bytes or truncated); the store is damaged"
                )
        return problems
