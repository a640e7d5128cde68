"""`tokenkit tokenize`: images -> V views each -> CLIP grid features -> nearest centroid -> token store.

Takes only a codebook (which names the encoder, its weights, layer, input size, grid and normalisation)
and an image source. Work shards of `shard_size` source rows are computed independently and committed
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
from tqdm import tqdm

from tokenkit.clip_encoder import load_encoder
from tokenkit.codebook import Codebook
from tokenkit.errors import CodebookError, ConfigError, ImageError
from tokenkit.images import list_source
from tokenkit.journal import FORMAT_VERSION, Journal, sha256_file, shard_ranges
from tokenkit.kmeans import assign
from tokenkit.loader import ViewDataset, autocast, iter_shard_batches, pick_device
from tokenkit.rowstore import STATUS_OK, STATUS_SKIPPED, create_arrays, write_shard
from tokenkit.views import ViewConfig
from tokenkit.wds import pack_record, write_tar

FORMATS = ("zarr", "wds", "both")


@dataclass(frozen=True)
class TokenizeConfig:
    views: ViewConfig = field(default_factory=ViewConfig)
    format: str = "zarr"
    shard_size: int = 1024
    on_error: str = "skip"
    batch_size: int = 32  # images per batch; each contributes V views to the CLIP forward
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        v = self.views
        if v.views < 1:
            raise ConfigError(f"--views {v.views}: must be >= 1")
        if v.mode not in ("center", "random"):
            raise ConfigError(f"--view {v.mode}: choose center or random")
        if (
            not (0 < v.scale[0] <= v.scale[1] <= 1)
            or not (0 < v.ratio[0] <= v.ratio[1])
            or not 0 <= v.flip <= 1
        ):
            raise ConfigError(f"--scale {v.scale} / --ratio {v.ratio} / --flip {v.flip}: out of range")
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format}: choose one of {', '.join(FORMATS)}")
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error {self.on_error}: choose skip or raise")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--shard-size and --batch-size must be >= 1, --workers >= 0")

    def job_fields(self) -> dict:
        return {
            "views": asdict(self.views),
            "format": self.format,
            "shard_size": self.shard_size,
            "on_error": self.on_error,
        }


def tar_name(shard: int) -> str:
    return f"wds/shard-{shard:06d}.tar"


def tokenize(
    images: str | Path,
    codebook_path: Path,
    out: Path,
    cfg: TokenizeConfig = TokenizeConfig(),
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> Path:
    """Write the token store of `images` under `codebook_path` to `out`."""
    cfg.validate()
    out, codebook_path = Path(out), Path(codebook_path)
    cb = Codebook.load(codebook_path)
    spec = cb.encoder
    source = list_source(images)
    n, G, V, K = len(source), spec.grid, cfg.views.views, cb.k
    tok_dtype = np.dtype(cb.token_dtype)
    assert K - 1 <= np.iinfo(tok_dtype).max
    device = pick_device(cfg.device)
    encoder = load_encoder(spec, device)
    if encoder.dim != cb.dim:
        raise CodebookError(
            f"{codebook_path}: centroids have dim {cb.dim} but {spec.model} gives {encoder.dim}-d features; "
            "use the codebook built from this model's features"
        )
    centroids = torch.from_numpy(cb.centroids).to(device)
    job = {
        "job": "tokenize",
        "codebook_sha256": cb.sha256,
        "encoder": spec.to_dict(),
        "config": cfg.job_fields(),
        "source": source.fingerprint(),
    }
    zarr_out, wds_out = cfg.format in ("zarr", "both"), cfg.format in ("wds", "both")
    journal = Journal(out)

    def init():
        shutil.copyfile(codebook_path, out / "codebook.safetensors")  # the store carries its codebook
        if zarr_out:
            create_arrays(
                out,
                n,
                cfg.shard_size,
                {
                    "tokens": ((V, G, G), tok_dtype.str),
                    "views": ((V, 5), "int32"),
                    "labels": ((), "int64"),
                    "keys": ((), "str"),
                    "locators": ((), "str"),
                    "status": ((), "uint8"),
                },
            )

    complete = journal.begin(job, resume, init) if rank == 0 else None
    barrier()
    if complete or journal.is_complete():
        return out
    ranges = shard_ranges(n, cfg.shard_size)
    todo = [(i, *ranges[i]) for i in journal.pending(len(ranges), rank, world)]
    dataset = ViewDataset(
        source, cfg.views, spec.image_size, spec.mean, spec.std, min_side=G, keep_bytes=wds_out
    )
    bar = tqdm(
        total=sum(e - s for _, s, e in todo), unit="img", disable=not progress, desc=f"tokenize[{rank}]"
    )
    buf = None
    for sid, items, last in iter_shard_batches(dataset, todo, cfg.batch_size, cfg.workers):
        start, stop = ranges[sid]
        if buf is None:
            rows = stop - start
            buf = {
                "tokens": np.zeros((rows, V, G, G), tok_dtype),
                "views": np.zeros((rows, V, 5), np.int32),
                "labels": source.labels[start:stop].copy(),
                "keys": np.asarray(source.keys[start:stop]),
                "locators": np.asarray(source.locators[start:stop]),
                "status": np.full(rows, STATUS_SKIPPED, np.uint8),
            }
            samples, skipped = [], []
        ok = [it for it in items if it["error"] is None]
        for it in items:
            if it["error"] is not None:
                if cfg.on_error == "raise":
                    raise ImageError(f"{it['error']} (or pass --on-error skip)")
                skipped.append([source.keys[it["index"]], it["error"]])
        if ok:
            x = torch.cat([it["pixels"] for it in ok]).to(device)  # (b*V, 3, S, S)
            with autocast(device, cfg.precision):
                f = encoder(x)  # (b*V, G*G, C)
            codes = assign(f.flatten(0, 1).float(), centroids, cb.metric)  # (b*V*G*G,)
            codes = codes.view(len(ok), V, G, G).cpu().numpy().astype(tok_dtype)  # (b, V, G, G)
            for j, it in enumerate(ok):
                r, i = it["index"] - start, it["index"]
                buf["tokens"][r], buf["views"][r], buf["status"][r] = codes[j], it["views"], STATUS_OK
                if wds_out:
                    ext = source.locators[i].rsplit(".", 1)[-1].lower() if source.kind == "folder" else "jpg"
                    samples.append(
                        {
                            "key": source.keys[i],
                            "ext": ext,
                            "data": it["data"],
                            "record": pack_record(codes[j], it["views"], int(source.labels[i])),
                        }
                    )
        bar.update(len(items))
        if not last:
            continue
        okm = buf["status"] == STATUS_OK
        record = {
            "shard": sid,
            "rows": [start, stop],
            "ok": int(okm.sum()),
            "skipped": skipped,
            "code_counts": np.bincount(buf["tokens"][okm].ravel(), minlength=K).tolist(),
            "label_counts": np.bincount(buf["labels"][okm] + 1, minlength=len(source.classes) + 1).tolist(),
            "sha256": {},
        }
        if wds_out:
            write_tar(out / tar_name(sid), samples)
            record["tar"] = {"path": tar_name(sid), "samples": len(samples)}
        if zarr_out:
            record["sha256"] = write_shard(out, sid, start, buf)
        if wds_out:
            record["sha256"][tar_name(sid)] = sha256_file(out / tar_name(sid))
        journal.commit(sid, record)
        buf = None
    bar.close()
    barrier()
    if rank == 0:
        records = journal.records(len(ranges))
        journal.finish(
            {
                "format_version": FORMAT_VERSION,
                "kind": "tokens",
                "job": job,
                "source": source.describe(),
                "codebook": {
                    "file": "codebook.safetensors",
                    "sha256": cb.sha256,
                    "k": K,
                    "dim": cb.dim,
                    "metric": cb.metric,
                },
                "grid": G,
                "num_views": V,
                "token_dtype": tok_dtype.name,
                "formats": [f for f, on in (("zarr", zarr_out), ("wds", wds_out)) if on],
                "n": n,
                "n_ok": sum(r["ok"] for r in records),
                "shards": [{k: r[k] for k in ("rows", "ok", "sha256", "tar") if k in r} for r in records],
                "skipped": [s for r in records for s in r["skipped"]],
                "code_counts": np.sum([r["code_counts"] for r in records], axis=0).tolist(),
                "label_counts": (np.sum([r["label_counts"] for r in records], axis=0)).tolist(),
            }
        )
    barrier()
    return out
