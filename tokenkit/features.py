"""`tokenkit features`: an encoder's grid features (CLIP, timm, HOG, pixels) of an image source, streamed
to a float16 zarr store.

Each image's central square is encoded; Q = min(G*G, ceil(max_patches / R)) of its G*G patch features,
chosen by a generator keyed by (seed, key), are kept, so the store holds about `max_patches` vectors for
k-means without ever holding them in RAM. Store arrays (R rows, source order):
  features (R, Q, C) float16, patch (R, Q) int16 grid index of each kept patch, keys (R,) str,
  status (R,) uint8 (0 stored, 1 skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tokenkit.device import autocast, pick_device, resolve_precision
from tokenkit.encoders import EncoderSpec, load_encoder
from tokenkit.errors import ConfigError, job_size_checks, require, seed_check
from tokenkit.images import list_source
from tokenkit.journal import FORMAT_VERSION
from tokenkit.loader import ViewDataset
from tokenkit.rowstore import STATUS_OK, STATUS_SKIPPED, RowStore, create_arrays, write_shard
from tokenkit.shardjob import run_shards
from tokenkit.views import ViewConfig, keyed_rng, normalize


@dataclass(frozen=True)
class FeaturesConfig:
    max_patches: int = 4_194_304  # the paper fits k-means on ~4.2M patch features
    shard_size: int = 1024
    seed: int = 0
    on_error: str = "skip"  # "skip": list bad images in the manifest; "raise": stop at the first one
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        require(
            (
                ("--max-patches", self.max_patches, 1 <= self.max_patches <= 2**36, "in [1, 2^36]"),
                seed_check(self.seed),
                *job_size_checks(self),
            )
        )
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"--on-error {self.on_error}: choose skip or raise")

    def job_fields(self) -> dict:
        """The config fields that change the output (batch size and workers do not; the device kind and
        precision are recorded beside them)."""
        d = asdict(self)
        return {k: d[k] for k in ("max_patches", "shard_size", "seed", "on_error")}


def no_barrier() -> None:
    pass


class FeatureStore(RowStore):
    kind = "features"

    @property
    def encoder(self) -> EncoderSpec:
        return EncoderSpec.from_dict(self.manifest["job"]["encoder"])

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def num_vectors(self) -> int:
        """Stored feature vectors: patches per image x images extracted without error."""
        return int((self.status() == STATUS_OK).sum()) * self.group["features"].shape[1]

    def sample(
        self, max_points: int, seed: int = 0, dtype=np.float32, rank: int = 0, world: int = 1
    ) -> np.ndarray:
        """Up to max_points stored feature vectors (M, C) in dtype (float16: as stored, half the memory),
        read shard by shard; with world > 1 only rank's share of them: rows rank, rank + world, ... (what a
        torchrun k-means fit holds per rank, tokenkit.kmeans.fit)."""
        feats = self.group["features"]
        Q = feats.shape[1]
        ok_rows = np.flatnonzero(self.status() == STATUS_OK)
        total = len(ok_rows) * Q
        rng = np.random.default_rng(seed)
        take = (
            np.sort(rng.choice(total, max_points, replace=False)) if total > max_points else np.arange(total)
        )
        take = take[rank::world]
        rows, cols = ok_rows[take // Q], take % Q
        out = np.empty((len(take), feats.shape[2]), dtype=dtype)
        S = feats.shards[0]
        pos = 0
        for s in range(0, feats.shape[0], S):
            sel = (rows >= s) & (rows < s + S)
            if not sel.any():
                continue
            block = feats[s : s + S]  # (shard rows, Q, C): one whole shard
            m = int(sel.sum())
            out[pos : pos + m] = block[rows[sel] - s, cols[sel]]
            pos += m
        return out


def extract_features(
    images: str | Path,
    out: Path,
    spec: EncoderSpec,
    cfg: FeaturesConfig = FeaturesConfig(),
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = no_barrier,
    progress: bool = True,
) -> Path:
    """Write the features store of `images` to `out` (resumable; ranks split the work shards)."""
    cfg.validate()
    out = Path(out)
    source = list_source(images)
    n, G = len(source), spec.grid
    Q = min(G * G, math.ceil(cfg.max_patches / n))
    device = pick_device(cfg.device)
    job = {
        "job": "features",
        "encoder": spec.to_dict(),
        "config": cfg.job_fields(),
        # what the features are computed with: a resume on another kind of device or precision is refused
        "compute": {"device": device.type, "precision": resolve_precision(device, cfg.precision)},
        "source": source.fingerprint(),
    }
    encoder = load_encoder(spec, device)
    C = encoder.dim
    dataset = ViewDataset(source, ViewConfig(1, "center"), spec.image_size, min_side=G)

    def init():
        arrays = {
            "features": ((Q, C), "float16"),
            "patch": ((Q,), "int16"),
            "keys": ((), "str"),
            "status": ((), "uint8"),
        }
        create_arrays(out, n, cfg.shard_size, arrays)

    def manifest(records: list[dict]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "features",
            "job": job,
            "source": source.describe(),
            "n": n,
            "n_ok": sum(r["ok"] for r in records),
            "patches_per_image": Q,
            "dim": C,
            "shards": [{"rows": r["rows"], "ok": r["ok"], "sha256": r["sha256"]} for r in records],
            "skipped": [*map(list, source.unlisted), *(s for r in records for s in r["skipped"])],
        }

    writer = _FeatureShard(out, source.keys, encoder, device, cfg, Q)
    run_shards(out, job, init, dataset, writer, manifest, cfg, resume, (rank, world, barrier), progress)
    return out


class _FeatureShard:
    """Buffers one work shard of features, writes it as one zarr shard per array."""

    def __init__(self, out: Path, keys, encoder, device, cfg: FeaturesConfig, Q: int):
        self.out, self.keys, self.encoder, self.device, self.cfg, self.Q = out, keys, encoder, device, cfg, Q

    def begin(self, start: int, stop: int) -> None:
        rows, C = stop - start, self.encoder.dim
        self.start = start
        self.buf = {
            "features": np.zeros((rows, self.Q, C), np.float16),
            "patch": np.zeros((rows, self.Q), np.int16),
            "keys": np.asarray(self.keys[start:stop]),
            "status": np.full(rows, STATUS_SKIPPED, np.uint8),
        }

    def add(self, items: list[dict], pixels: torch.Tensor) -> None:
        G2 = self.encoder.spec.grid**2
        x = normalize(
            pixels.to(self.device, non_blocking=True), self.encoder.spec.mean, self.encoder.spec.std
        )  # (b*V, 3, S, S)
        with autocast(self.device, self.cfg.precision):
            f = self.encoder(x).float().cpu().numpy()  # (b, G*G, C)
        for j, it in enumerate(items):
            r = it["index"] - self.start
            # the kept patches are keyed by (seed, key): the same whatever the batch or rank
            pick = np.sort(keyed_rng(self.cfg.seed, self.keys[it["index"]]).choice(G2, self.Q, replace=False))
            self.buf["features"][r] = f[j, pick].astype(np.float16)
            self.buf["patch"][r] = pick
            self.buf["status"][r] = STATUS_OK

    def seal(self, shard: int) -> Callable[[], dict]:
        buf, start = self.buf, self.start  # begin() replaces them for the next shard

        def write() -> dict:
            return {
                "ok": int((buf["status"] == STATUS_OK).sum()),
                "sha256": write_shard(self.out, shard, start, buf),
            }

        return write
