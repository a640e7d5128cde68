"""`tokenkit tokenize`: images -> V views each -> a tokenizer's ids -> token store.

Takes only a tokenizer file (a codebook, which names its feature extractor, weights, layer, input size, grid
and normalisation; or a converted quantizer) and an image source. Work shards of `shard_size` source rows are computed independently and committed
one by one, so a killed job resumes where it stopped, and ranks under torchrun split the shards and write
the same store one process would.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokenkit.device import resolve_precision
from tokenkit.errors import ConfigError, job_size_checks, require, seed_check
from tokenkit.images import list_source
from tokenkit.journal import FORMAT_VERSION, sha256_file
from tokenkit.loader import ViewDataset
from tokenkit.rowstore import STATUS_OK, STATUS_SKIPPED, create_arrays, write_shard
from tokenkit.shardjob import run_shards
from tokenkit.tokenizer import Tokenizer, load_tokenizer
from tokenkit.views import ViewConfig
from tokenkit.wds import pack_record, write_tar

FORMATS = ("zarr", "wds", "both")
MAX_VIEWS = 1024  # stored views per image (the paper stores 1; 8-10 bring geometric augmentation back)
MAX_BATCH_GIB = 4  # the uint8 views of one batch, decoded in the workers and held until tokenized
TOKENIZER_FILE = "tokenizer.safetensors"


@dataclass(frozen=True)
class TokenizeConfig:
    views: ViewConfig = field(default_factory=ViewConfig)
    format: str = "zarr"
    shard_size: int = 1024
    on_error: str = "skip"
    batch_size: int = 32  # images per batch; each contributes V views to the tokenizer's forward
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"

    def validate(self, view_side: int | None = None) -> None:
        """view_side: the tokenizer's view size S, to bound a batch's pixels (B x V x S x S x 3 bytes)."""
        v = self.views
        require(
            (
                ("--views", v.views, 1 <= v.views <= MAX_VIEWS, f"in [1, {MAX_VIEWS}]"),
                ("--scale", v.scale, 0 < v.scale[0] <= v.scale[1] <= 1, "MIN MAX with 0 < MIN <= MAX <= 1"),
                (
                    "--ratio",
                    v.ratio,
                    1e-3 <= v.ratio[0] <= v.ratio[1] <= 1e3,
                    "MIN MAX with 1e-3 <= MIN <= MAX <= 1e3",
                ),
                ("--flip", v.flip, 0 <= v.flip <= 1, "in [0, 1]"),
                seed_check(v.seed),
                *job_size_checks(self),
            )
        )
        if v.mode not in ("center", "random"):
            raise ConfigError(f"--view {v.mode}: choose center or random")
        if v.mode == "center" and v.views > 1:
            raise ConfigError(
                f"--views {v.views} with --view center: every view would be the same central square; pass "
                "--views 1 or --view random"
            )
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format}: choose one of {', '.join(FORMATS)}")
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error {self.on_error}: choose skip or raise")
        if (
            view_side is not None
            and (gib := self.batch_size * v.views * view_side**2 * 3 / 2**30) > MAX_BATCH_GIB
        ):
            raise ConfigError(
                f"--batch-size {self.batch_size} x --views {v.views} at {view_side} px: {gib:.1f} GiB of pixels a "
                f"batch (at most {MAX_BATCH_GIB}); lower --batch-size"
            )

    def job_fields(self) -> dict:
        return {
            "views": asdict(self.views),
            "format": self.format,
            "shard_size": self.shard_size,
            "on_error": self.on_error,
        }


def tar_name(shard: int) -> str:
    return f"wds/shard-{shard:06d}.tar"


def token_dtype(k: int) -> np.dtype:
    """The smallest dtype that holds ids < k: uint16 up to K = 65535."""
    return np.dtype("uint16" if k <= 65535 else "int32")


def tokenize(
    images: str | Path,
    tokenizer_path: Path,
    out: Path,
    cfg: TokenizeConfig = TokenizeConfig(),
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> Path:
    """Write the token store of `images` under the tokenizer file `tokenizer_path` to `out`."""
    cfg.validate()
    out, tokenizer_path = Path(out), Path(tokenizer_path)
    tok = load_tokenizer(tokenizer_path, cfg.device, cfg.precision)
    cfg.validate(tok.image_size)
    source = list_source(images)
    n, G, V, K = len(source), tok.grid, cfg.views.views, tok.k
    tok_dtype = token_dtype(K)
    assert K - 1 <= np.iinfo(tok_dtype).max
    job = {
        "job": "tokenize",
        "tokenizer_id": tok.id,
        "tokenizer": tok.identity,
        "config": cfg.job_fields(),
        # what the tokens are computed with: a resume on another kind of device or precision is refused
        "compute": {"device": tok.device.type, "precision": resolve_precision(tok.device, cfg.precision)},
        "source": source.fingerprint(),
    }
    zarr_out, wds_out = cfg.format in ("zarr", "both"), cfg.format in ("wds", "both")
    dataset = ViewDataset(
        source, cfg.views, tok.image_size, min_side=G, keep_bytes=wds_out, interpolation=tok.interpolation
    )

    def init():
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)  # the store carries its tokenizer
        if zarr_out:
            arrays = {
                "tokens": ((V, G, G), tok_dtype.str),
                "views": ((V, 5), "int32"),
                "labels": ((), "int64"),
                "keys": ((), "str"),
                "locators": ((), "str"),
                "crc32": ((), "uint32"),  # of the source image's bytes: the trainer re-reads and checks them
                "status": ((), "uint8"),
            }
            create_arrays(out, n, cfg.shard_size, arrays)

    def manifest(records: list[dict]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "tokens",
            "job": job,
            "source": source.describe(),
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "id": tok.id,
                "kind": tok.identity["kind"],
                "family": tok.identity["family"],
                "k": K,
                "image_size": tok.image_size,
                "identity": tok.identity,
            },
            "grid": G,
            "num_views": V,
            "token_dtype": tok_dtype.name,
            "formats": [f for f, on in (("zarr", zarr_out), ("wds", wds_out)) if on],
            "n": n,
            "n_ok": sum(r["ok"] for r in records),
            "shards": [{k: r[k] for k in ("rows", "ok", "sha256", "tar") if k in r} for r in records],
            "skipped": [*map(list, source.unlisted), *(s for r in records for s in r["skipped"])],
            "code_counts": np.sum([r["code_counts"] for r in records], axis=0).tolist(),
            "label_counts": np.sum([r["label_counts"] for r in records], axis=0).tolist(),
        }

    writer = _TokenShard(out, source, tok, cfg, tok_dtype, zarr_out, wds_out)
    run_shards(out, job, init, dataset, writer, manifest, cfg, resume, (rank, world, barrier), progress)
    return out


class _TokenShard:
    """Buffers one work shard of tokens; writes its zarr shards and/or its webdataset tar."""

    def __init__(self, out, source, tokenizer: Tokenizer, cfg, tok_dtype, zarr_out, wds_out):
        self.out, self.source, self.tokenizer, self.cfg = out, source, tokenizer, cfg
        self.tok_dtype, self.zarr_out, self.wds_out = tok_dtype, zarr_out, wds_out
        self.K, self.device = tokenizer.k, tokenizer.device  # run_shards pins memory for CUDA

    def begin(self, start: int, stop: int) -> None:
        src, rows, V, G = self.source, stop - start, self.cfg.views.views, self.tokenizer.grid
        self.start, self.samples = start, []
        self.buf = {
            "tokens": np.zeros((rows, V, G, G), self.tok_dtype),
            "views": np.zeros((rows, V, 5), np.int32),
            "labels": src.labels[start:stop].copy(),
            "keys": np.asarray(src.keys[start:stop]),
            "locators": np.asarray(src.locators[start:stop]),
            "crc32": np.zeros(rows, np.uint32),
            "status": np.full(rows, STATUS_SKIPPED, np.uint8),
        }

    def add(self, items: list[dict], pixels: torch.Tensor) -> None:
        V, G = self.cfg.views.views, self.tokenizer.grid
        codes = self.tokenizer(pixels)  # (b*V, G, G) on the tokenizer's device
        codes = codes.view(len(items), V, G, G).cpu().numpy().astype(self.tok_dtype)  # (b, V, G, G)
        rows = [it["index"] - self.start for it in items]
        self.buf["tokens"][rows] = codes
        self.buf["views"][rows] = [it["views"] for it in items]
        self.buf["crc32"][rows] = [it["crc32"] for it in items]
        self.buf["status"][rows] = STATUS_OK
        if self.wds_out:  # the token records are packed on the commit thread
            self.samples += [(it["index"], it["data"]) for it in items]

    def seal(self, shard: int) -> Callable[[], dict]:
        buf, samples, start = self.buf, self.samples, self.start  # begin() replaces them for the next shard

        def write() -> dict:
            okm = buf["status"] == STATUS_OK
            n_classes = len(self.source.classes)
            record = {
                "ok": int(okm.sum()),
                "sha256": {},
                "code_counts": np.bincount(buf["tokens"][okm].ravel(), minlength=self.K).tolist(),
                "label_counts": np.bincount(buf["labels"][okm] + 1, minlength=n_classes + 1).tolist(),
            }
            if self.zarr_out:
                record["sha256"] = write_shard(self.out, shard, start, buf)
            if self.wds_out:
                path, src, members = tar_name(shard), self.source, []
                for i, data in samples:
                    r = i - start
                    packed = pack_record(buf["tokens"][r], buf["views"][r], int(buf["labels"][r]))
                    members.append({"key": src.keys[i], "ext": src.ext(i), "data": data, "record": packed})
                index = write_tar(self.out / path, members).relative_to(self.out).as_posix()
                record["tar"] = {"path": path, "samples": len(samples), "index": index}
                record["sha256"][path] = sha256_file(self.out / path)
                record["sha256"][index] = sha256_file(self.out / index)
            return record

        return write
