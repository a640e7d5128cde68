"""Atomic files and the progress journal that makes sharded jobs resumable.

A job's output folder holds:
  _job.json              the job spec (config + input fingerprints); written first, checked on --resume
  _progress/NNNNNN.json  one record per finished work shard; its presence is the shard's commit marker
  manifest.json          written last by rank 0 from all records; its presence means the store is complete

Every file is written to a temporary name, fsynced, and renamed, so a reader never sees a partial file.
A shard without a record is redone from scratch on resume, overwriting whatever a killed run left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from tokenkit.errors import StoreError

FORMAT_VERSION = 2  # bumped whenever an on-disk layout changes; readers refuse newer versions


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` (its folder created if missing) through a temporary file, fsync it, rename it
    into place, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named by the file the user knows, not by its temporary name
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StoreError(
            f"{path}: unreadable JSON ({e}); the file is damaged, re-run the job that wrote it"
        ) from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of a manifest as canonical JSON, without its own `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def metadata_sha256(root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every zarr metadata file (zarr.json) under root."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("zarr.json"))}


def check_format_version(path: Path, manifest: dict, kind: str) -> None:
    """Refuse manifests of another kind or of a newer format version than this code reads."""
    if manifest.get("kind") != kind:
        raise StoreError(
            f"{path}: holds a '{manifest.get('kind')}' store, expected '{kind}'; pass a {kind} store"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path}: {format_mismatch(version)}")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise StoreError(
            f"{path}/manifest.json: its content does not match its checksum (edited or damaged); restore it or "
            "re-run the job that made the store"
        )


def format_mismatch(version, current: int = FORMAT_VERSION) -> str:
    """Why a file of another format version than `current` cannot be read, and the fix."""
    if isinstance(version, int) and version < current:
        return f"format_version {version} was written by an older version (this one reads {current}); re-run the job that made it"
    return f"format_version {version} is newer than this version reads ({current}); upgrade tokenkit-mapet"


class Journal:
    """Progress of one sharded job in `out`. Ranks of a distributed job share one journal folder."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.job_path = self.out / "_job.json"
        self.progress = self.out / "_progress"
        self.manifest_path = self.out / "manifest.json"

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    def begin(self, spec: dict, resume: bool, init: Callable[[], None]) -> bool:
        """Check or create the job spec. Returns True when the store is already complete with this spec.

        A new job runs `init` (create the arrays) before `_job.json` is written, so a job folder exists
        only once it is fully initialised. A folder that holds another job, or an unfinished job without
        `resume`, is refused.
        """
        spec = json.loads(json.dumps(spec))  # compare as stored: tuples become lists
        if self.manifest_path.exists():
            manifest = read_json(self.manifest_path)
            if manifest.get("job") != spec:
                diff = "; ".join(differences(manifest.get("job") or {}, spec)[:3])
                raise StoreError(
                    f"{self.out}: holds a complete store made by another job ({diff}); choose another output folder"
                )
            self._drop_progress()  # a job killed right after its manifest left these behind
            return True
        if self.job_path.exists():
            if (was := read_json(self.job_path)) != spec:
                raise StoreError(
                    f"{self.out}: holds an unfinished job with other settings ({'; '.join(differences(was, spec)[:3])}); "
                    "resume with the same ones, or choose another output folder"
                )
            if not resume:
                raise StoreError(f"{self.out}: holds an unfinished job; pass --resume to continue it")
            remove_torn_writes(self.out)
            return False
        if self.out.exists() and any(self.out.iterdir()):
            # a job killed while initialising leaves arrays but no _job.json: start it again
            if not (resume and any((self.out / m).exists() for m in ("zarr.json", "codebook.safetensors"))):
                raise StoreError(
                    f"{self.out}: folder is not empty and holds no tokenkit job; choose an empty folder"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        init()
        self.progress.mkdir(exist_ok=True)
        atomic_write_json(self.job_path, spec)
        return False

    def record_path(self, shard: int) -> Path:
        return self.progress / f"{shard:06d}.json"

    def pending(self, n_shards: int, rank: int = 0, world: int = 1) -> list[int]:
        """Shards of this rank (round-robin over the global shard list) that have no commit record."""
        return [i for i in range(rank, n_shards, world) if not self.record_path(i).exists()]

    def commit(self, shard: int, record: dict) -> None:
        atomic_write_json(self.record_path(shard), record)

    def records(self, n_shards: int) -> list[dict]:
        missing = [i for i in range(n_shards) if not self.record_path(i).exists()]
        if missing:
            raise StoreError(
                f"{self.out}: shards {missing[:5]} are not finished; re-run the same command with --resume"
            )
        return [read_json(self.record_path(i)) for i in range(n_shards)]

    def finish(self, manifest: dict) -> None:
        """Write the manifest (the commit marker of the whole store), then drop the progress records. The
        manifest records the sha256 of every zarr metadata file (`metadata`: dtype, byte order, shape,
        chunking, codecs) and of itself (`manifest_sha256`), so that nothing a reader trusts is unchecked."""
        manifest = {**manifest, "metadata": metadata_sha256(self.out)}
        atomic_write_json(self.manifest_path, {**manifest, "manifest_sha256": manifest_sha256(manifest)})
        self._drop_progress()

    def _drop_progress(self) -> None:
        if self.progress.exists():
            for p in sorted(self.progress.iterdir()):
                p.unlink()
            self.progress.rmdir()
        self.job_path.unlink(missing_ok=True)
        remove_torn_writes(self.out)


_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's LocalStore writes NAME.<uuid hex>.partial


def remove_torn_writes(out: Path) -> None:
    """Delete the temporary files a killed job left behind: ours (`.NAME.tmp-PID`) and zarr's
    (`NAME.<uuid>.partial`). Never valid: each is renamed into place only once complete."""
    for f in out.rglob("*"):
        if f.is_file() and ((f.name.startswith(".") and ".tmp-" in f.name) or _ZARR_PARTIAL.search(f.name)):
            f.unlink()


def differences(was, now, where: str = "") -> list[str]:
    """`key: old -> new` for every leaf where two JSON-like values differ (nested keys joined by dots)."""
    if isinstance(was, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(was) | set(now), key=str):
            out += differences(was.get(k), now.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if was == now else [f"{where or 'value'}: {json.dumps(was)[:60]} -> {json.dumps(now)[:60]}"]


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the work shards of an n-row job."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
