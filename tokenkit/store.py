"""Reading a token store: tokens + views (+ image) by index or key, in blocks; verify; statistics.

A store is the folder `tokenkit tokenize` wrote: manifest.json, tokenizer.safetensors, the zarr arrays
(tokens (R, V, G, G), views (R, V, 5), labels, keys, locators, status) and/or wds/shard-*.tar.
Positions 0..len-1 address the stored (not skipped) rows in source order.
"""

from __future__ import annotations

import difflib
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenkit.codebook import code_usage
from tokenkit.errors import CodebookError, StoreError, TokenkitError
from tokenkit.images import decode_image, read_locator, sanitize_key
from tokenkit.journal import sha256_file
from tokenkit.rowstore import STATUS_OK, RowStore
from tokenkit.tokenizer import describe, file_identity, identity_id
from tokenkit.wds import index_tar, iter_tar, load_index


class TokenStore(RowStore):
    kind = "tokens"

    def __init__(self, root: Path, manifest: dict):
        super().__init__(root, manifest)
        self._rows = None
        self._key_index = None
        self._meta = None

    def __getstate__(self) -> dict:
        # what a DataLoader worker's copy carries: `meta` (the point of holding it), not the key index,
        # which is rebuilt on demand
        return {**super().__getstate__(), "_key_index": None}

    @property
    def has_zarr(self) -> bool:
        return "zarr" in self.manifest["formats"]

    @property
    def grid(self) -> int:
        return self.manifest["grid"]

    @property
    def num_views(self) -> int:
        return self.manifest["num_views"]

    @property
    def k(self) -> int:
        return self.manifest["tokenizer"]["k"]

    @property
    def tokenizer_id(self) -> str:
        """The sha256 of the tokenizer's identity (tokenkit.tokenizer): what the trainer compares."""
        return self.manifest["tokenizer"]["id"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["source"]["classes"]

    def tar_paths(self) -> list[Path]:
        return [self.root / s["tar"]["path"] for s in self.manifest["shards"] if "tar" in s]

    def tar_indexes(self) -> list[Path]:
        """The sample index saved beside each tar (tar_paths' order)."""
        return [self.root / s["tar"]["index"] for s in self.manifest["shards"] if "tar" in s]

    def part(self, name: str | None):
        """select(rel) for verify_files / file_stats: the files of one format ("zarr": the arrays, "wds": the
        tars and their indexes), or None for every file."""
        if name is None:
            return None
        wds = {
            rel
            for s in self.manifest["shards"]
            if "tar" in s
            for rel in (s["tar"]["path"], s["tar"].get("index"))
            if rel
        }
        return (lambda rel: rel in wds) if name == "wds" else (lambda rel: rel not in wds)

    def _need_zarr(self):
        if not self.has_zarr:
            raise StoreError(
                f"{self.root}: this store has only webdataset shards, no zarr arrays; read its tars or tokenize "
                "again with --format zarr"
            )

    @property
    def rows(self) -> np.ndarray:
        """(len,) int64 source rows of the stored samples."""
        if self._rows is None:
            self._need_zarr()
            self._rows = np.flatnonzero(self.status() == STATUS_OK)
        return self._rows

    def __len__(self) -> int:
        return self.manifest["n_ok"]

    META = ("views", "labels", "keys", "locators", "crc32")  # per-row metadata, held in memory by `meta`

    def meta(self) -> dict[str, np.ndarray]:
        """The stored rows' metadata, read once and kept: views (n, V, 5) int32, labels (n,) int64, keys and
        locators (n,) numpy strings, crc32 (n,) uint32 (absent in stores written before it was kept).

        zarr decodes a whole chunk for every row a random read touches, ~0.3-0.6 ms each whatever the row's
        size, so reading these five small arrays per training batch cost more than decoding the batch's
        images. Held here (a few hundred MB for ImageNet at V = 8; numpy arrays without Python objects, so
        forked DataLoader workers share them), a batch reads only its tokens."""
        if self._meta is None:
            self._need_zarr()
            g, rows = self.group, self.rows
            self._meta = {name: g[name][:][rows] for name in self.META if name in g}
        return self._meta

    def read(self, positions) -> dict:
        """Read a block of stored samples by position.

        Returns tokens (b, V, G, G) int64, views (b, V, 5) int32, labels (b,) int64, keys and locators
        list[str], and crc32 (b,) uint32 of the source images' bytes (stores written before it was recorded
        have none), in the order of `positions`. Tokens are fetched with one sorted orthogonal read; the rest
        from `meta` once it was called (the trainer), else the same way.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions out of range [0, {len(self)})")
        uniq, inv = np.unique(self.rows[pos], return_inverse=True)
        g = self.group
        if self._meta is None:  # one-off reads (show, checks) fetch just these rows; the trainer holds `meta`
            out = {name: g[name].get_orthogonal_selection((uniq,))[inv] for name in self.META if name in g}
        else:
            out = {name: a[pos] for name, a in self._meta.items()}
        # embeddings index with int64; uint16 is the disk dtype
        out["tokens"] = g["tokens"].get_orthogonal_selection((uniq,))[inv].astype(np.int64)
        out["keys"] = [str(k) for k in out["keys"]]
        out["locators"] = [str(k) for k in out["locators"]]
        return out

    def blocks(self, size: int = 1024):
        """Every stored sample in order, a block at a time: (tokens (b, V, G, G) int64, labels (b,) int64,
        {"keys": list[str], "views": (b, V, 5) int32}); from the zarr arrays, else from the tars."""
        if self.has_zarr:
            for s in range(0, len(self), size):
                r = self.read(np.arange(s, min(s + size, len(self))))
                yield r["tokens"], r["labels"], {"keys": r["keys"], "views": r["views"]}
            return
        buf = []
        for tar, index in zip(self.tar_paths(), self.tar_indexes(), strict=True):
            for sample in iter_tar(tar, load_index(index)):
                buf.append(sample)
                if len(buf) == size:
                    yield _stack(buf)
                    buf = []
        if buf:
            yield _stack(buf)

    def index_of(self, key: str) -> int:
        if self._key_index is None:
            self._need_zarr()
            keys = self.group["keys"].get_orthogonal_selection((self.rows,))
            self._key_index = {str(k): i for i, k in enumerate(keys)}
        if key in self._key_index:
            return self._key_index[key]
        # the source path it came from: extension dropped, dots in the file name stored as '_'
        found = {k for k in (sanitize_key(key), sanitize_key(key.rsplit(".", 1)[0])) if k in self._key_index}
        if len(found) == 1:
            return self._key_index[found.pop()]
        if found:
            raise StoreError(
                f"{self.root}: '{key}' may be key '{sorted(found)[0]}' or '{sorted(found)[1]}'; pass one"
            )
        near = (
            difflib.get_close_matches(key, list(self._key_index), n=1) if len(self._key_index) < 10**5 else []
        )
        hint = f" (closest: '{near[0]}')" if near else ""
        raise StoreError(f"{self.root}: no stored sample with key '{key}'{hint}")

    def image_bytes(self, position: int, source_root: str | None = None) -> bytes:
        """The original image bytes, read from the source the store records (or `source_root`), checked
        against their stored crc32."""
        return self.block_source(self.read([position]), 0, source_root)

    def block_source(self, block: dict, j: int, source_root: str | None = None) -> bytes:
        """The image bytes of row j of a `read` block, checked against its stored crc32 (when it has one)."""
        crc32 = block["crc32"][j] if "crc32" in block else None
        return self.read_source(block["locators"][j], source_root, crc32)

    def read_source(self, locator: str, source_root: str | None = None, crc32: int | None = None) -> bytes:
        """The bytes behind a locator of this store's source (a moved folder can be passed as source_root).
        With `crc32` (as `read` returns it) the bytes must be the ones tokenized: the stored tokens describe
        those pixels, so an image replaced since (re-encoded, edited, another file of the same name) is refused
        instead of training on targets of other pixels."""
        src = self.manifest["source"]
        root = source_root or src["root"]
        try:
            data = read_locator(src["kind"], root, src["tars"], locator)
        except OSError as e:
            raise StoreError(
                f"{root}: cannot read source image '{locator}' ({e.strerror or e}); if the images moved, pass "
                "their folder as --source-root"
            ) from e
        if crc32 is not None and zlib.crc32(data) != int(crc32):
            raise StoreError(
                f"{root}: source image '{locator}' changed since it was tokenized (crc32 {zlib.crc32(data):08x}, "
                f"stored {int(crc32):08x}); restore the original file or re-run 'tokenkit tokenize'"
            )
        return data

    def image(self, position: int, source_root: str | None = None):
        return decode_image(self.image_bytes(position, source_root), f"{self.root}[{position}]")

    def check_compatible(
        self,
        tokenizer_id: str | None = None,
        k: int | None = None,
        grid: int | None = None,
        num_views: int | None = None,
    ) -> None:
        """Refuse a store whose tokenizer, K, grid or views differ from what the caller was configured for."""
        for name, want, have in (
            ("tokenizer id", tokenizer_id, self.tokenizer_id),
            ("K", k, self.k),
            ("grid", grid, self.grid),
            ("views", num_views, self.num_views),
        ):
            if want is not None and want != have:
                raise StoreError(
                    f"{self.root}: store {name} {have} != expected {want}; "
                    "tokenize with the matching tokenizer or change the run's config"
                )

    def stats(self) -> dict:
        """What `tokenkit inspect` prints: counts, codebook usage, labels, shards."""
        label_counts = self.manifest["label_counts"]
        labels = {"unlabelled": label_counts[0]} if label_counts[0] else {}
        names = self.classes or [str(i) for i in range(len(label_counts) - 1)]
        labels.update({names[i]: c for i, c in enumerate(label_counts[1:])})
        return {
            "path": str(self.root),
            "format_version": self.manifest["format_version"],
            "formats": self.manifest["formats"],
            "images": len(self),
            "source_images": self.manifest["n"],
            "skipped": len(self.manifest["skipped"]),
            "views": self.num_views,
            "grid": self.grid,
            "k": self.k,
            "token_dtype": self.manifest["token_dtype"],
            "tokenizer_id": self.tokenizer_id,
            "tokenizer": describe(self.manifest["tokenizer"]["identity"]),
            "codebook_usage": code_usage(self.manifest["code_counts"]),
            "labels": labels,
            "shards": len(self.manifest["shards"]),
        }


def _stack(samples: list[dict]) -> tuple:
    """A block of tar samples as TokenStore.blocks yields it."""
    tokens = np.stack([s["tokens"] for s in samples]).astype(np.int64)
    labels = np.array([s["label"] for s in samples], dtype=np.int64)
    return (
        tokens,
        labels,
        {"keys": [s["key"] for s in samples], "views": np.stack([s["views"] for s in samples])},
    )


def verify_sources(
    store: TokenStore, source_root: str | None = None, threads: int = 8, progress: bool = True
) -> list[str]:
    """Every stored sample whose source image is missing or changed since tokenizing (its bytes' crc32 is not
    the stored one), one line each. Reads every image once, `threads` at a time (the reads wait on disk);
    what the trainer checks image by image, done up front. Empty for webdataset-only stores, which carry their
    images (their tars' checksums cover them)."""
    if not store.has_zarr:
        return []
    if "crc32" not in store.group:
        raise StoreError(
            f"{store.root}: written before stores kept their images' crc32, so there is nothing to compare the "
            "source images with; re-run 'tokenkit tokenize' to get them"
        )

    def check(pair) -> str | None:
        locator, crc = pair
        try:
            store.read_source(locator, source_root, int(crc))
        except StoreError as e:
            return str(e)
        return None

    meta = store.meta()  # locators and crc32 of every stored row, without reading the tokens
    pairs = list(zip(meta["locators"].tolist(), meta["crc32"].tolist(), strict=True))
    problems, block = [], 4096  # submitted a block at a time: ImageNet's 1.28M futures at once would be GiBs
    with (
        ThreadPoolExecutor(threads) as pool,
        tqdm(total=len(pairs), unit="img", desc="sources", disable=not progress) as bar,
    ):
        for s in range(0, len(pairs), block):
            problems += [p for p in pool.map(check, pairs[s : s + block]) if p]
            bar.update(len(pairs[s : s + block]))
    return problems


def verify(path: Path, part: str | None = None, rank: int = 0, world: int = 1) -> list[str]:
    """Every problem found in the store at `path`, one line each (empty when it is sound).

    Trusts nothing it has not checked: the manifest against its own checksum (on open), every zarr metadata
    file (dtype, byte order, shape, chunking, codecs) and shard file against the sha256 the manifest
    records, the tokenizer file against the manifest's tokenizer id; then every stored value against its
    meaning: token ids < K, crop boxes with x, y >= 0 and width, height >= 1, flip 0 or 1, labels in [-1,
    classes), status 0 or 1, the per-shard and total counts of samples, codes and labels, and key
    uniqueness (zarr and across tars). part "zarr" or "wds" checks only that format's files and contents
    (what a reader of that format reads), None both. With world > 1, shards are split over the ranks (shard
    i on rank i % world; the union of the ranks' findings is the whole check, but for duplicate keys across
    tars of different ranks and the store-wide totals, which only a single-process verify sees).
    """
    try:
        store = TokenStore.open(path)
    except TokenkitError as e:
        return [str(e)]
    problems = store.verify_files(store.part(part), rank, world)
    for rel, want in store.manifest["metadata"].items():
        if (store.has_zarr and part != "wds") and (
            not (store.root / rel).is_file() or sha256_file(store.root / rel) != want
        ):
            problems.append(
                f"{store.root / rel}: zarr metadata changed since tokenize (dtype, byte order, shape or codecs); the store is damaged"
            )
    try:
        if (got := identity_id(file_identity(store.tokenizer_path))) != store.tokenizer_id:
            problems.append(
                f"{store.tokenizer_path}: tokenizer id {got[:16]} != manifest {store.tokenizer_id[:16]}; the store and "
                "its tokenizer do not match"
            )
    except CodebookError as e:
        problems.append(str(e))
    if problems:
        return problems  # content checks below assume the files are intact
    totals = Counts(store.k, len(store.classes))
    if store.has_zarr and part != "wds":
        problems += _verify_zarr(store, rank, world, totals)
    problems += _verify_tars(store, part, rank, world, totals)
    if world == 1 and not problems:
        problems += totals.check(store)
    return problems


class Counts:
    """Per-code and per-label counts of the stored samples, to compare with the manifest's."""

    def __init__(self, k: int, classes: int):
        self.codes, self.labels = np.zeros(k, np.int64), np.zeros(classes + 1, np.int64)
        self.filled = False

    def add(self, tokens: np.ndarray, labels: np.ndarray) -> None:
        if self.filled:
            return  # both formats hold the same samples: count them once
        self.codes += np.bincount(tokens.ravel(), minlength=len(self.codes))[: len(self.codes)]
        self.labels += np.bincount(labels + 1, minlength=len(self.labels))[: len(self.labels)]

    def check(self, store: TokenStore) -> list[str]:
        m, out = store.manifest, []
        if self.codes.tolist() != m["code_counts"]:
            out.append(
                f"{store.root}/manifest.json: code_counts differ from the stored tokens'; the store is damaged"
            )
        if self.labels.tolist() != m["label_counts"]:
            out.append(
                f"{store.root}/manifest.json: label_counts differ from the stored labels'; the store is damaged"
            )
        return out


def _values(
    where: str, k: int, classes: int, tokens: np.ndarray, views: np.ndarray, labels: np.ndarray
) -> list[str]:
    """What is wrong with a block of stored values: tokens (b, V, G, G), views (b, V, 5), labels (b,)."""
    out = []
    if tokens.size and (tokens.min() < 0 or tokens.max() >= k):
        out.append(f"{where}: token id {int(tokens.max())} out of [0, K={k}); the store is damaged")
    x, y, w, h, flip = (views[..., i] for i in range(5))
    if views.size and ((x < 0) | (y < 0) | (w < 1) | (h < 1) | ((flip != 0) & (flip != 1))).any():
        out.append(
            f"{where}: a crop box outside the image (x, y < 0, or width, height < 1) or a flip not 0 / 1"
        )
    if labels.size and ((labels < -1) | (labels >= classes)).any():
        out.append(f"{where}: label {int(labels.max())} out of [-1, {classes}) for {classes} classes")
    return out


def _verify_zarr(store: TokenStore, rank: int, world: int, totals: Counts) -> list[str]:
    m, g, problems = store.manifest, store.group, []
    status = store.status()
    if not np.isin(status, (STATUS_OK, 1)).all():
        problems.append(f"{store.root}/status: values other than 0 (stored) and 1 (skipped)")
    classes = len(store.classes)
    for i, shard in enumerate(m["shards"]):
        s, e = shard["rows"]
        ok = status[s:e] == STATUS_OK
        if int(ok.sum()) != shard["ok"]:
            problems.append(
                f"{store.root}: shard {i} holds {int(ok.sum())} samples, manifest says {shard['ok']}"
            )
        if i % world != rank and world > 1:
            continue
        tokens, labels = g["tokens"][s:e][ok].astype(np.int64), g["labels"][s:e][ok]
        problems += _values(f"{store.root}: shard {i}", store.k, classes, tokens, g["views"][s:e][ok], labels)
        if not problems:
            totals.add(tokens, labels)
    totals.filled = world == 1
    keys = g["keys"][:]
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        problems.append(f"{store.root}/keys: duplicated key '{uniq[counts > 1][0]}'")
    return problems


def _verify_tars(store: TokenStore, part: str | None, rank: int, world: int, totals: Counts) -> list[str]:
    problems, seen, classes = [], set(), len(store.classes)
    for i, shard in enumerate(store.manifest["shards"]):
        if "tar" not in shard or part == "zarr" or i % world != rank:
            continue
        p = store.root / shard["tar"]["path"]
        try:
            refs = index_tar(p)  # from the tar itself
            if load_index(store.root / shard["tar"]["index"]) != refs:
                problems.append(
                    f"{store.root / shard['tar']['index']}: does not list the samples of {p}; re-run tokenize"
                )
            n = 0
            for sample in iter_tar(p, refs):
                n += 1
                if sample["key"] in seen:
                    problems.append(f"{p}: key '{sample['key']}' also appears in an earlier shard")
                seen.add(sample["key"])
                tokens, label = sample["tokens"].astype(np.int64), np.array([sample["label"]])
                problems += _values(
                    f"{p}: sample '{sample['key']}'", store.k, classes, tokens, sample["views"], label
                )
                totals.add(tokens, label)
            if n != shard["tar"]["samples"]:
                problems.append(f"{p}: {n} samples, manifest says {shard['tar']['samples']}")
        except TokenkitError as e:
            problems.append(str(e))
    totals.filled = totals.filled or world == 1
    return problems
