"""k-means for k-CLIP codebooks, and nearest-centroid assignment. The only module that imports faiss.

Two backends with one meaning:
  faiss  faiss.Kmeans, on its GPUs when faiss-gpu sees any (guarded: `Kmeans(gpu=True)` silently runs on
         the CPU when none is found), CPU faiss otherwise;
  torch  batched matmul + argmin + index_add Lloyd iterations, bf16 distances on CUDA; the GPU path when
         faiss-gpu is not installed.
Both initialise from k distinct random sample points, subsample to k * max_points_per_centroid points,
keep the best of `nredo` runs, and split the largest cluster into empty ones. `metric="cosine"` is
spherical k-means: inputs and centroids are L2-normalised here, so callers never normalise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tokenkit.errors import ConfigError, MissingDependencyError

METRICS = ("l2", "cosine")
BACKENDS = ("auto", "faiss", "torch")


@dataclass(frozen=True)
class KMeansConfig:
    """The paper's k-CLIP recipe by default (K 8192, 20 iterations, best of 5, 512 points per centroid)."""

    k: int = 8192
    niter: int = 20
    nredo: int = 5
    metric: str = "l2"
    max_points_per_centroid: int = 512
    seed: int = 0
    backend: str = "auto"

    def validate(self) -> None:
        if not 1 < self.k <= 2**31 - 1:
            raise ConfigError(f"--k {self.k}: must be in [2, 2^31 - 1]")
        if self.niter < 1 or self.nredo < 1:
            raise ConfigError(f"--niter {self.niter} / --nredo {self.nredo}: both must be >= 1")
        if self.metric not in METRICS:
            raise ConfigError(f"--metric {self.metric}: choose one of {', '.join(METRICS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend}: choose one of {', '.join(BACKENDS)}")
        if self.max_points_per_centroid < 1:
            raise ConfigError(f"--max-points-per-centroid {self.max_points_per_centroid}: must be >= 1")


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (K, C) float32
    objective: float  # mean squared distance of the training points to their nearest centroid
    sizes: np.ndarray  # (K,) int64 training points per cluster
    backend: str  # what actually ran, e.g. "faiss-cpu", "faiss-gpu:2", "torch-cuda"


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise MissingDependencyError(
            "faiss is not installed; pip install 'tokenkit-mapet[cpu]' (faiss-cpu) or "
            "'tokenkit-mapet[gpu]' (faiss-gpu), or pass --backend torch"
        ) from e
    return faiss


def normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def fit(x: np.ndarray, cfg: KMeansConfig, device: str | None = None) -> KMeansResult:
    """Cluster x (M, C) into cfg.k centroids. Returns float32 centroids (K, C) and the objective on x."""
    cfg.validate()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if cfg.metric == "cosine":
        x = normalize(x)
    if x.shape[0] < cfg.k:
        raise ConfigError(
            f"--k {cfg.k}: only {x.shape[0]} feature vectors; extract more patches or lower --k"
        )
    backend = cfg.backend
    if backend == "auto":
        try:
            _faiss()
            backend = "faiss"
        except MissingDependencyError:
            backend = "torch"
    if backend == "faiss":
        centroids, ran = _fit_faiss(x, cfg)
    else:
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        centroids, ran = _fit_torch(torch.from_numpy(x).to(dev), cfg), f"torch-{torch.device(dev).type}"
    labels, d2 = assign(x, centroids, cfg.metric, return_distances=True)
    sizes = np.bincount(labels, minlength=cfg.k).astype(np.int64)
    return KMeansResult(centroids, float(d2.mean()), sizes, ran)


def _fit_faiss(x: np.ndarray, cfg: KMeansConfig) -> tuple[np.ndarray, str]:
    faiss = _faiss()
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    km = faiss.Kmeans(
        x.shape[1],
        cfg.k,
        niter=cfg.niter,
        nredo=cfg.nredo,
        seed=cfg.seed,
        spherical=cfg.metric == "cosine",
        max_points_per_centroid=cfg.max_points_per_centroid,
        gpu=ngpu if ngpu > 0 else False,
        verbose=False,
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32), f"faiss-gpu:{ngpu}" if ngpu else "faiss-cpu"


def _nearest(
    x: torch.Tensor, c: torch.Tensor, block: int = 65536, low: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x (M, C) among c (K, C): indices (M,) int64, squared distances (M,).
    low: bf16 dot products (k-means iterations on a GPU: Lloyd's steps tolerate near-tie flips, and it halves
    the traffic); tokens and objectives always use the exact fp32 path."""
    c2 = (c * c).sum(1)  # (K,)
    cm = c.to(torch.bfloat16) if low else c
    idx, dist = [], []
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block]
        if low:
            d = c2[None, :] - 2 * (xb.to(torch.bfloat16) @ cm.T).float()  # (b, K)
        else:
            d = torch.addmm(c2[None, :], xb, cm.T, alpha=-2)  # (b, K) = |c|^2 - 2 x.c in one pass
        v, i = d.min(1)  # |x|^2 is constant per row: added after the argmin
        idx.append(i)
        dist.append((v + (xb * xb).sum(1)).clamp_min_(0))
    return torch.cat(idx), torch.cat(dist)


def _fit_torch(x: torch.Tensor, cfg: KMeansConfig) -> np.ndarray:
    n, d = x.shape
    gen = torch.Generator().manual_seed(cfg.seed)
    cap = cfg.k * cfg.max_points_per_centroid
    if n > cap:
        x = x[torch.randperm(n, generator=gen)[:cap].to(x.device)]
        n = cap
    best, best_obj = None, math.inf
    for _ in range(cfg.nredo):
        c = x[torch.randperm(n, generator=gen)[: cfg.k].to(x.device)].clone()  # (K, C) distinct points
        for _ in range(cfg.niter):
            a, _ = _nearest(x, c, low=x.is_cuda)
            counts = torch.bincount(a, minlength=cfg.k)  # (K,)
            sums = torch.zeros_like(c).index_add_(0, a, x)  # (K, C)
            nonempty = counts > 0
            c = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(c.dtype), c)
            c = _split_empty(c, counts, gen)
            if cfg.metric == "cosine":
                c = torch.nn.functional.normalize(c, dim=1)
        _, dist = _nearest(x, c)
        obj = float(dist.sum())
        if obj < best_obj:
            best, best_obj = c, obj
    return best.float().cpu().numpy()


def _split_empty(
    c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator, eps: float = 1 / 1024
) -> torch.Tensor:
    """faiss's rule: an empty cluster takes a copy of a big cluster's centroid, both nudged apart by eps."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return c
    counts = counts.clone().cpu()
    for j in empty:
        p = (counts - 1).clamp_min(0).double()
        src = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        sign = torch.where(torch.arange(c.shape[1], device=c.device) % 2 == 0, 1.0, -1.0).to(c.dtype)
        c[j] = c[src] * (1 + eps * sign)
        c[src] = c[src] * (1 - eps * sign)
        counts[j] = counts[src] // 2
        counts[src] -= counts[j]
    return c


def assign(x, centroids, metric: str = "l2", return_distances: bool = False, block: int = 65536):
    """Nearest centroid (L2 after normalising both for "cosine") of each row of x.

    x: (M, C) numpy or torch; centroids: (K, C). Returns (M,) int64 (and (M,) float32 squared distances)
    in the type and on the device of x.
    """
    is_np = isinstance(x, np.ndarray)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if is_np else x.float()
    ct = torch.as_tensor(centroids, dtype=torch.float32, device=xt.device)
    if metric == "cosine":
        xt, ct = torch.nn.functional.normalize(xt, dim=1), torch.nn.functional.normalize(ct, dim=1)
    idx, dist = _nearest(xt, ct, block)
    if is_np:
        idx, dist = idx.numpy(), dist.numpy()
    return (idx, dist) if return_distances else idx
