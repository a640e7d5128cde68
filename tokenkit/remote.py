"""Image shards where they live: IMAGES given as URLs, as webdataset opens them.

`pipe:CMD` (the shard is CMD's output), `http(s)://` (through curl, as webdataset does) and, with fsspec
installed, any scheme fsspec knows (`s3://`, `gs://`, ...). Every tool here reads a sample's bytes by their
offset in its tar (the index a token store keeps, the images the trainer re-renders), which a stream cannot
give, so each shard is fetched once into a local shard cache and read from there (`use_cache_dir`; the CLIs
pass TOKENKIT_SHARD_CACHE; by default ~/.cache/tokenkit/shards), a file per URL named by the URL's sha256. A fetch is written beside its
place and renamed into it, so the cache holds whole shards only. A token store given as a URL (`mapet
pretrain --tokens https://...`) is mirrored the same way, file by file, each file checked against the sha256
its manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from tqdm import tqdm

from tokenkit.errors import SourceError
from tokenkit.journal import sha256_file

URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")  # a store's relative file names


def is_url(spec: str) -> bool:
    return bool(URL.match(spec)) and not spec.startswith("file://")


_CACHE: dict[str, Path | None] = {"dir": None}


def use_cache_dir(path: str | Path | None) -> None:
    """Keep fetched shards and mirrored stores in `path` (None: the default); the CLIs pass
    TOKENKIT_SHARD_CACHE."""
    _CACHE["dir"] = Path(path) if path else None


def cache_dir() -> Path:
    return _CACHE["dir"] or Path.home() / ".cache" / "tokenkit" / "shards"


def cached_path(url: str) -> Path:
    """Where the shard of `url` is kept: its URL's sha256 and the name it ends with."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1].rsplit(" ", 1)[-1])[-60:]
    return cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{tail or 'shard'}"


def open_url(url: str):
    """A binary stream of the URL: webdataset's opener for pipe: and http(s), fsspec for the other schemes."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("pipe", "http", "https"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError as e:
        raise SourceError(
            f"{url}: {scheme}:// URLs are read through fsspec; pip install fsspec (and s3fs for s3)"
        ) from e
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as e:  # no fsspec implementation of the scheme
        raise SourceError(f"{url}: no reader for {scheme}:// ({e}); install its fsspec package") from e


def fetch(url: str) -> Path:
    """The local copy of the shard at `url`, fetched unless the cache holds it."""
    dest = cached_path(url)
    if not dest.is_file():
        download(url, dest)
    return dest


def download(url: str, dest: Path) -> None:
    """The bytes at `url` into `dest`, written beside it and renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # threads fetch at once
    try:
        with open(tmp, "wb") as out:
            src = open_url(url)
            try:
                shutil.copyfileobj(src, out, 1 << 20)
            finally:
                src.close()  # webdataset's pipes raise here when their command failed
        if tmp.stat().st_size == 0:
            raise OSError("nothing was received")
        os.replace(tmp, dest)
    except SourceError:
        raise
    except Exception as e:  # curl's, the pipe command's or fsspec's failure, whatever its type
        why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise SourceError(f"{url}: could not be fetched ({why}); check the URL") from e
    finally:
        tmp.unlink(missing_ok=True)


def mirror_store(url: str, progress: bool = True) -> Path:  # progress: a bar on a terminal
    """A token or features store at a URL (http(s)://, or a scheme fsspec knows), mirrored read-only into the
    cache (TOKENKIT_SHARD_CACHE/stores, a folder per URL and manifest: a store that changed on its server is
    mirrored afresh, never over files a run may be reading): its manifest, then every file the manifest
    checksums, each checked against its sha256 as it arrives; files already mirrored are kept."""
    if url.startswith("pipe:"):
        raise SourceError(f"{url}: a store is read file by file; pass its http(s):// or fsspec URL")
    base = url.rstrip("/")
    staged = cache_dir() / "stores" / f".{cached_path(base).name}.manifest-{os.getpid()}"
    download(base + "/manifest.json", staged)  # the remote's current manifest, every time
    local = cache_dir() / "stores" / f"{cached_path(base).name}-{sha256_file(staged)[:12]}"
    local.mkdir(parents=True, exist_ok=True)
    os.replace(staged, local / "manifest.json")
    try:
        m = json.loads((local / "manifest.json").read_text())
        files = dict(m.get("metadata", {}))
        files |= {rel: sha for shard in m["shards"] for rel, sha in shard["sha256"].items() if sha}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"{base}/manifest.json: not a tokenkit store's manifest ({e})") from e
    if bad := [rel for rel in files if not SAFE_NAME.fullmatch(rel) or ".." in rel.split("/")]:
        raise SourceError(f"{base}/manifest.json: lists a file outside the store ({bad[0][:80]}); refused")
    if "tokenizer" in m:
        files.setdefault("tokenizer.safetensors", None)  # no checksum of its own: fetched each time
    bar = tqdm(
        sorted(files.items()),
        desc="mirror store",
        unit="file",
        disable=None if progress else True,
        leave=False,
    )
    for rel, sha in bar:
        dest = local / rel
        if sha is not None and dest.is_file() and sha256_file(dest) == sha:
            continue
        download(f"{base}/{rel}", dest)
        if sha is not None and sha256_file(dest) != sha:
            dest.unlink()
            raise SourceError(
                f"{base}/{rel}: its sha256 is not the manifest's; the remote store is damaged or changed"
            )
    return local


def fetch_all(urls: list[str], progress: bool = True) -> list[str]:
    """Local copies of every shard, in order."""
    bar = tqdm(
        urls,
        desc="fetch shards",
        unit="shard",
        disable=None if progress and len(urls) > 1 else True,
        leave=False,
    )
    return [str(fetch(u)) for u in bar]
