"""The codebook file: k-means centroids plus everything `tokenize` needs to rebuild the feature extractor.

One safetensors file (no pickle, nothing executes on load): tensor `centroids` (K, C) float32, and the
metadata key `tokenkit` holding JSON: format_version, kind "codebook", the encoder spec (family, model,
weights id, layer, image size, grid, normalisation, family settings), the k-means config, the final
objective, the cluster sizes, the features store it was fitted on, and `sha256` of the centroids'
little-endian float32 bytes. Quantizer files (tokenkit.quantizer) share the header's place and checks
(`read_header`).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from tokenkit.encoders import EncoderSpec
from tokenkit.errors import CodebookError, ConfigError, load_failure
from tokenkit.features import FeatureStore
from tokenkit.journal import FORMAT_VERSION, atomic_write_bytes, format_mismatch
from tokenkit.kmeans import FitJournal, KMeansConfig, fit, resolve_backend
from tokenkit.lock import OutputLock
from tokenkit.stopsignal import StopSignal


def read_header(path: Path) -> dict:
    """The `tokenkit` metadata of a codebook or quantizer file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(
            f"{path}: tokenizer file not found; build a codebook with 'tokenkit codebook' or convert a code "
            "model with 'tokenkit convert'"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        header = json.loads(metadata["tokenkit"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CodebookError(
            f"{path}: not a tokenkit safetensors file ({load_failure(e)}); pickled or damaged files are "
            "refused: build it with 'tokenkit codebook' or 'tokenkit convert'"
        ) from e
    if not isinstance(header, dict):
        raise CodebookError(f"{path}: its tokenkit metadata is not a JSON object; rebuild the file")
    if header.get("format_version") != FORMAT_VERSION:
        raise CodebookError(f"{path}: {format_mismatch(header.get('format_version'))}")
    return header


def code_usage(counts) -> dict:
    """How evenly K codes are used, from per-code counts: codes used, perplexity of the usage (K when even,
    1 when one code takes everything) and the largest code's share."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    return {
        "used_codes": int((counts > 0).sum()),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
        "largest_cluster_share": float(counts.max() / max(total, 1)),
    }


def centroids_sha256(centroids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(centroids, dtype="<f4").tobytes()).hexdigest()


@dataclass
class Codebook:
    centroids: np.ndarray  # (K, C) float32
    encoder: EncoderSpec
    meta: dict  # kmeans config, objective, sizes, fitted_on, backend

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def metric(self) -> str:
        return self.meta["kmeans"]["metric"]

    @property
    def sha256(self) -> str:
        return centroids_sha256(self.centroids)

    @property
    def token_dtype(self) -> str:
        return "uint16" if self.k <= 65535 else "int32"  # uint16 holds ids < 2**16

    def identity(self) -> dict:
        """Everything that changes a token: the feature extractor's spec, the metric and the centroids."""
        return {
            "kind": "codebook",
            "family": self.encoder.family,
            "encoder": self.encoder.to_dict(),
            "metric": self.metric,
            "centroids_sha256": self.sha256,
        }

    def header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "codebook",
            "encoder": self.encoder.to_dict(),
            "k": self.k,
            "dim": self.dim,
            "sha256": self.sha256,
            **self.meta,
        }

    def stats(self) -> dict:
        """What `tokenkit inspect CODEBOOK` prints: size, encoder, k-means settings and result, and how evenly
        the training sample used the codes."""
        return {
            "k": self.k,
            "dim": self.dim,
            "sha256": self.sha256,
            "encoder": self.encoder.model,
            "weights": self.encoder.weights_id,
            "layer": self.encoder.layer,
            "image_size": self.encoder.image_size,
            "grid": self.encoder.grid,
            "kmeans": self.meta["kmeans"],
            "backend": self.meta["backend"],
            "objective": self.meta["objective"],
            "n_train": self.meta["n_train"],
            "fitted_on": self.meta["fitted_on"]["path"],
            "codebook_usage": code_usage(self.meta["sizes"]),
        }

    def save(self, path: Path) -> None:
        data = save(
            {"centroids": np.ascontiguousarray(self.centroids, dtype=np.float32)},
            metadata={"tokenkit": json.dumps(self.header(), sort_keys=True)},
        )
        atomic_write_bytes(Path(path), data)

    @classmethod
    def load(cls, path: Path) -> Codebook:
        path = Path(path)
        header = read_header(path)
        if header.get("kind") != "codebook":
            raise CodebookError(f"{path}: a tokenkit '{header.get('kind')}' file, not a codebook")
        tensors = load_file(str(path))
        if "centroids" not in tensors:
            raise CodebookError(f"{path}: no centroids tensor; the file is damaged, rebuild it")
        centroids = tensors["centroids"]
        if centroids_sha256(centroids) != header["sha256"]:
            raise CodebookError(
                f"{path}: centroids sha256 does not match its header; the file is damaged, rebuild it"
            )
        meta = {
            k: v
            for k, v in header.items()
            if k not in ("format_version", "kind", "encoder", "k", "dim", "sha256")
        }
        return cls(centroids, EncoderSpec.from_dict(header["encoder"]), meta)


def progress_path(out: Path) -> Path:
    """Where `build_codebook` keeps the k-means progress for the codebook `out` until it is written."""
    return Path(out).with_name(Path(out).name + ".progress")


def build_codebook(
    features: Path,
    out: Path,
    cfg: KMeansConfig,
    device: str | None = None,
    progress: bool = True,
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier=lambda: None,
) -> Codebook:
    """`tokenkit codebook`: k-means over a sample of a features store, saved as a codebook file.

    Reads at most k * max_points_per_centroid vectors, so memory is bounded by the k-means sample, not by the
    store: float16 as stored for the torch backend, float32 for faiss (which takes nothing else). The fit's
    progress is kept in OUT.progress (tokenkit.kmeans.FitJournal) until OUT is written: on SIGTERM it stops
    at the end of its iteration (faiss: restart), and `resume` continues it to the uninterrupted result.
    Under torchrun (torch backend) each rank reads and holds 1/world of the sample on its GPU; rank 0 writes.
    """
    cfg.validate()
    out = Path(out)
    check_writable(out)
    with OutputLock(out) if rank == 0 else nullcontext():  # one writer: rank 0 of one job holds it
        return _fit(features, out, cfg, device, progress, resume, rank, world, barrier)


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output file that could not be written: a folder, or in a folder that
    cannot be made or written."""
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; pass the .safetensors file to write")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: its folder {parent} cannot be written; choose another output")


def _fit(features, out: Path, cfg: KMeansConfig, device, progress, resume, rank, world, barrier) -> Codebook:
    journal_path = progress_path(out)
    if journal_path.exists() and not resume:
        raise ConfigError(
            f"{journal_path}: an unfinished k-means for {out}; pass --resume to continue it or delete it"
        )
    if rank == 0:
        for tmp in out.parent.glob(f".{out.name}*.tmp-*"):  # torn writes of a killed fit; never valid
            tmp.unlink()
    store = FeatureStore.open(features)
    backend = resolve_backend(cfg.backend, world)
    fitted_on = {"path": str(Path(features).resolve()), "job": store.manifest["job"]["source"]}
    if resume and out.exists() and not journal_path.exists():
        done = Codebook.load(out)  # finished before: the same fit is not run again
        if done.meta.get("kmeans") == asdict(cfg) and done.meta.get("fitted_on") == fitted_on:
            return done
    if cfg.k > (stored := store.num_vectors()):
        raise ConfigError(
            f"--k {cfg.k}: {features} holds {stored} feature vectors, fewer than K; pass a smaller --k or extract "
            "more (tokenkit features --max-patches, more images)"
        )
    dtype = np.float32 if backend == "faiss" else np.float16
    cap = cfg.k * cfg.max_points_per_centroid
    x = store.sample(cap, seed=cfg.seed, dtype=dtype, rank=rank, world=world)  # (M / world, C)
    n = min(cap, store.num_vectors())  # the whole sample's
    progress = progress and rank == 0
    if progress:
        ranks = f" over {world} ranks" if world > 1 else ""
        print(
            f"k-means: {n} x {x.shape[1]}{ranks} -> K={cfg.k}, {cfg.niter} iterations x {cfg.nredo} restarts"
        )
    fingerprint = {**asdict(cfg), "backend": backend, "n": n, "dim": int(x.shape[1]), **fitted_on}
    with StopSignal() as stop:
        journal = FitJournal(journal_path, fingerprint, stop, write=rank == 0)
        result = fit(x, cfg, device, progress, journal, rank, world)
    meta = {
        "kmeans": asdict(cfg),
        "backend": result.backend,
        "objective": result.objective,
        "n_train": n,
        "sizes": result.sizes.tolist(),
        "fitted_on": fitted_on,
    }
    cb = Codebook(result.centroids, store.encoder, meta)
    if rank == 0:
        cb.save(out)
        journal_path.unlink(missing_ok=True)  # after the codebook: a kill in between leaves the fit resumable
    barrier()
    return cb
