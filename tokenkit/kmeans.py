"""k-means for k-CLIP codebooks, and nearest-centroid assignment. The only module that imports faiss.

Two backends with one meaning:
  faiss  faiss.Kmeans, on its GPUs when faiss-gpu sees any (guarded: `Kmeans(gpu=True)` silently runs on
         the CPU when none is found), CPU faiss otherwise;
  torch  batched matmul + argmin + index_add Lloyd iterations, bf16 distances on CUDA; the GPU path when
         faiss-gpu is not installed; under torchrun each rank holds and assigns a share of the sample and
         the cluster sums and counts are all-reduced (fit).
Both initialise from k distinct random sample points, subsample to k * max_points_per_centroid points,
keep the best of `nredo` runs, and split the largest cluster into empty ones. `metric="cosine"` is
spherical k-means: inputs and centroids are L2-normalised here, so callers never normalise.

A fit may keep its progress in a `FitJournal` (`tokenkit codebook` does, beside its output): killed or
preempted, it resumes where it stopped and ends with the uninterrupted fit's centroids (expected times at the
paper's scale: docs/benchmarks.md).

Memory at the paper's scale (4.2M x 4096 CLIP features): the torch backend keeps the sample in the dtype it
comes in (float16, as features are stored: 32 GiB instead of 64 on the GPU) and converts one block of rows
at a time to float32; faiss needs float32 on the host. The final assignment (objective, cluster sizes) runs
block by block on the GPU when torch sees one, whichever backend fitted.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from tokenkit.errors import CodebookError, ConfigError, MissingDependencyError, require
from tokenkit.journal import atomic_write_bytes
from tokenkit.stopsignal import Stopped, StopSignal

METRICS = ("l2", "cosine")
BACKENDS = ("auto", "faiss", "torch")
# faiss seeds restart r with seed + 1 + r * this: one restart per call with seed + r * this draws the same
FAISS_REDO_SEED = 15486557
SAVE_EVERY_S = 120.0  # seconds between a journaled fit's saves within a restart (torch backend)


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
        require(
            (
                ("--k", self.k, 1 < self.k <= 2**31 - 1, "in [2, 2^31 - 1]"),
                ("--niter", self.niter, 1 <= self.niter <= 10**5, "in [1, 10^5]"),
                ("--nredo", self.nredo, 1 <= self.nredo <= 1000, "in [1, 1000]"),
                (
                    "--max-points-per-centroid",
                    self.max_points_per_centroid,
                    1 <= self.max_points_per_centroid <= 2**20,
                    "in [1, 2^20]",
                ),
                ("--seed", self.seed, 0 <= self.seed < 2**31, "in [0, 2^31 - 1]"),  # faiss's seed is an int
            )
        )
        if self.metric not in METRICS:
            raise ConfigError(f"--metric {self.metric}: choose one of {', '.join(METRICS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend}: choose one of {', '.join(BACKENDS)}")


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (K, C) float32
    objective: float  # mean squared distance of the training points to their nearest centroid
    sizes: np.ndarray  # (K,) int64 training points per cluster
    backend: (
        str  # what actually ran, e.g. "faiss-cpu", "faiss-gpu:2" (GPUs), "torch-cuda", "torch-cuda:8" (ranks)
    )


class FitJournal:
    """A k-means fit's progress in one safetensors file, so that a killed or preempted fit resumes where it
    stopped and ends with the uninterrupted fit's centroids. Written atomically after every restart, every
    `every` seconds within one (torch backend: the restart's centroids and the generator's state), and at
    the end of the iteration (faiss: restart) in flight once `stop` has recorded a SIGTERM; the fit then
    raises Stopped. `fingerprint` (JSON values) names the fit: a journal of another fit is refused."""

    KEY = "tokenkit-kmeans"

    def __init__(
        self,
        path: Path,
        fingerprint: dict,
        stop: StopSignal | None = None,
        every: float = SAVE_EVERY_S,
        write: bool = True,
    ):
        self.path, self.stop, self.every, self.write = Path(path), stop, every, write
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back
        self.saved_at = time.monotonic()

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.signum is not None

    def due(self) -> bool:
        return self.stopping or time.monotonic() - self.saved_at >= self.every

    def load(self) -> dict | None:
        """The saved state (tensors on the CPU, numbers), or None when nothing was saved."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[self.KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CodebookError(
                f"{self.path}: unreadable k-means progress ({e}); delete it to start over"
            ) from e
        was = meta.pop("fingerprint")
        if was != self.fingerprint:
            diff = ", ".join(
                f"{k} {was.get(k)} -> {self.fingerprint.get(k)}"
                for k in sorted({*was, *self.fingerprint})
                if was.get(k) != self.fingerprint.get(k)
            )
            raise ConfigError(
                f"{self.path}: the progress of another k-means ({diff}); run it with its settings or delete it"
            )
        return {**meta, **tensors}

    def save(self, **state) -> None:
        """state: tensors (saved from the CPU) and JSON numbers. Under torchrun only rank 0's journal writes
        (`write`): every rank holds the same state."""
        if self.write:
            tensors = {
                k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)
            }
            meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
            header = json.dumps({"fingerprint": self.fingerprint, **meta})
            atomic_write_bytes(self.path, save(tensors, metadata={self.KEY: header}))
        self.saved_at = time.monotonic()

    def stopped(self, where: str) -> Stopped:
        signum = (
            self.stop.signum if self.stop and self.stop.signum else signal.SIGTERM
        )  # another rank's signal
        return Stopped(signum, f"{where}: {self.path} holds it; run again with --resume")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise MissingDependencyError(
            "faiss is not installed; pip install 'tokenkit-mapet[cpu]' (faiss-cpu) or "
            "'tokenkit-mapet[gpu]' (faiss-gpu), or pass --backend torch"
        ) from e
    return faiss


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def resolve_backend(backend: str, world: int = 1) -> str:
    """The backend `auto` stands for: faiss when it is installed (and the fit runs in one process: faiss uses
    a node's GPUs itself), else the torch backend."""
    if backend != "auto" or world > 1:
        return "torch" if backend == "auto" else backend
    try:
        _faiss()
        return "faiss"
    except MissingDependencyError:
        return "torch"


def fit(
    x: np.ndarray,
    cfg: KMeansConfig,
    device: str | None = None,
    progress: bool = False,
    journal: FitJournal | None = None,
    rank: int = 0,
    world: int = 1,
) -> KMeansResult:
    """Cluster x (M, C) float16 or float32 into cfg.k centroids. Returns float32 centroids (K, C), and the
    objective and cluster sizes on x. device: where the torch backend fits and the final assignment runs
    (default: the GPU when torch sees one). journal: where the fit keeps its progress and resumes from.

    Under torchrun (world > 1, torch backend): x is this rank's share of the sample, its rows rank, rank +
    world, ... (FeatureStore.sample); each rank assigns its rows and the cluster sums, counts and objectives
    are all-reduced, so every rank holds the same centroids, sizes and objective (those of the whole sample,
    up to the order of float sums)."""
    cfg.validate()
    n = _all_sum(torch.tensor(x.shape[0]), world).item()  # the whole sample's rows
    if n < cfg.k:
        raise ConfigError(f"--k {cfg.k}: only {n} feature vectors; extract more patches or lower --k")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cosine = cfg.metric == "cosine"
    xt = torch.from_numpy(np.ascontiguousarray(x))  # (M, C) in x's dtype, x's memory when contiguous
    backend = resolve_backend(cfg.backend, world)
    if world > 1 and backend != "torch":
        raise ConfigError(
            "--backend faiss under torchrun: faiss uses every GPU of one process itself; run it without "
            "torchrun, or pass --backend torch (or auto)"
        )
    if world > 1 and n > cfg.k * cfg.max_points_per_centroid:
        raise ConfigError(
            f"{n} vectors over {world} ranks: more than k x max_points_per_centroid; pass a sample that fits"
        )
    if backend == "faiss":
        # x itself when small enough (faiss then subsamples no further); no copy when float32 already
        sample = _subsample(xt, cfg)[0].numpy()
        x32 = np.ascontiguousarray(sample, dtype=np.float32)
        centroids, ran = _fit_faiss(unit_rows(x32) if cosine else x32, cfg, progress, journal)
        del sample, x32
    else:
        c = _fit_torch(xt, cfg, dev, progress, journal, rank, world)
        centroids, ran = c.cpu().numpy(), f"torch-{dev.type}" + (f":{world}" if world > 1 else "")
    labels, d2 = _nearest(xt, torch.from_numpy(centroids).to(dev), normalize=cosine)
    sizes = _all_sum(torch.bincount(labels, minlength=cfg.k), world).cpu().numpy().astype(np.int64)
    return KMeansResult(centroids, float(_all_sum(d2.double().sum(), world)) / n, sizes, ran)


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """t summed over the ranks of a torchrun job (in place), the same on every rank; t itself for one rank.
    Moved to the current GPU for NCCL, and back."""
    if world == 1:
        return t
    dev = t.device
    on = t.cuda() if torch.distributed.get_backend() == "nccl" and not t.is_cuda else t
    torch.distributed.all_reduce(on)
    return on.to(dev)


def _subsample(x: torch.Tensor, cfg: KMeansConfig) -> tuple[torch.Tensor, torch.Generator]:
    """At most k * max_points_per_centroid rows of x, drawn by the fit's generator (seeded: a resumed fit
    draws the same), and that generator."""
    gen = torch.Generator().manual_seed(cfg.seed)
    cap = cfg.k * cfg.max_points_per_centroid
    if x.shape[0] > cap:
        x = x[torch.randperm(x.shape[0], generator=gen)[:cap]]
    return x, gen


def _fit_faiss(
    x: np.ndarray, cfg: KMeansConfig, progress: bool, journal: FitJournal | None
) -> tuple[np.ndarray, str]:
    """faiss k-means, one restart per call (what faiss's own nredo draws and keeps, so a journal can hold
    the best restart so far); x holds at most k * max_points_per_centroid rows (faiss subsamples no further)."""
    faiss = _faiss()
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    state = journal.load() if journal else None
    best, best_obj = (state["best"].numpy(), state["best_obj"]) if state else (None, math.inf)
    for r in range(state["redo"] if state else 0, cfg.nredo):
        km = faiss.Kmeans(
            x.shape[1],
            cfg.k,
            niter=cfg.niter,
            nredo=1,
            seed=cfg.seed + FAISS_REDO_SEED * r,
            spherical=cfg.metric == "cosine",
            max_points_per_centroid=cfg.max_points_per_centroid,
            gpu=ngpu if ngpu > 0 else False,
            verbose=progress,  # faiss's own line per iteration (time, objective); it has no hook for a bar
        )
        km.train(x)
        if km.obj[-1] < best_obj:  # faiss's rule: the last iteration's objective
            best, best_obj = np.ascontiguousarray(km.centroids, dtype=np.float32), float(km.obj[-1])
        if progress:
            print(f"k-means restart {r + 1} of {cfg.nredo}: objective {km.obj[-1]:.6g} (best {best_obj:.6g})")
        if journal:
            journal.save(redo=r + 1, best=torch.from_numpy(best), best_obj=best_obj)
            if journal.stopping and r + 1 < cfg.nredo:
                raise journal.stopped(f"after k-means restart {r + 1} of {cfg.nredo}")
    return best, f"faiss-gpu:{ngpu}" if ngpu else "faiss-cpu"


def _nearest(
    x: torch.Tensor,
    c: torch.Tensor,
    block: int = 65536,
    low: bool = False,
    normalize: bool = False,
    sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x (M, C) among c (K, C): indices (M,) int64 and squared distances (M,)
    on c's device. x may be float16 and on another device: each block of rows is moved and converted to
    float32 on its own (L2-normalised first when `normalize`). low: bf16 dot products (k-means iterations
    on a GPU: Lloyd's steps tolerate near-tie flips, and it halves the traffic); tokens and objectives always
    use the exact fp32 path. sums (K, C) float32, when given, accumulates each cluster's rows (Lloyd's update)."""
    c2 = (c * c).sum(1)  # (K,)
    cm = c.to(torch.bfloat16) if low else c
    idx, dist = [], []
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block].to(c.device, non_blocking=True).float()  # (b, C)
        if normalize:
            xb = F.normalize(xb, dim=1)
        if low:
            d = c2[None, :] - 2 * (xb.to(torch.bfloat16) @ cm.T).float()  # (b, K)
        else:
            d = torch.addmm(c2[None, :], xb, cm.T, alpha=-2)  # (b, K) = |c|^2 - 2 x.c in one pass
        v, i = d.min(1)  # |x|^2 is constant per row: added after the argmin
        idx.append(i)
        dist.append((v + (xb * xb).sum(1)).clamp_min_(0))
        if sums is not None:
            sums.index_add_(0, i, xb)
    return torch.cat(idx), torch.cat(dist)


def _fit_torch(
    x: torch.Tensor,
    cfg: KMeansConfig,
    device: torch.device,
    progress: bool,
    journal: FitJournal | None,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """Lloyd's iterations on device; x (M, C) float16 or float32 on the CPU is moved there in its own dtype.
    With a journal, the restart and iteration, centroids, best restart and generator state are saved (see
    FitJournal) and a saved state is continued. Under torchrun x is this rank's share (see fit): the draws
    are the same on every rank, the sums and counts all-reduced."""
    x, gen = _subsample(x, cfg)
    n = int(_all_sum(torch.tensor(x.shape[0]), world).item())  # the whole sample's rows
    x = x.to(device)
    low, cosine = x.is_cuda, cfg.metric == "cosine"
    state = journal.load() if journal else None
    r, i, best, best_obj, c = 0, 0, None, math.inf, None
    if state:
        gen.set_state(state["generator"])
        r, i, best_obj = state["redo"], state["iter"], state["best_obj"]
        best = state["best"].to(device) if "best" in state else None
        c = state["c"].to(device) if "c" in state else None
    bar = tqdm(
        total=cfg.nredo * cfg.niter,
        initial=r * cfg.niter + i,
        unit="iter",
        desc=f"k-means {n} x {x.shape[1]}",
        disable=not progress,
    )
    while r < cfg.nredo:
        if i == 0:  # k distinct points of the whole sample; row g is row g // world of rank g % world
            pick = torch.randperm(n, generator=gen)[: cfg.k]
            mine = pick % world == rank
            c = torch.zeros(cfg.k, x.shape[1], device=device)  # (K, C)
            c[mine.to(device)] = x[(pick[mine] // world).to(device)].float()
            c = _all_sum(c, world)
            if cosine:
                c = F.normalize(c, dim=1)
        while i < cfg.niter:
            sums = torch.zeros_like(c)  # (K, C)
            a, _ = _nearest(x, c, low=low, normalize=cosine, sums=sums)
            sums, counts = _all_sum(sums, world), _all_sum(torch.bincount(a, minlength=cfg.k), world)  # (K,)
            c = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None].to(c.dtype), c)
            c = _split_empty(c, counts, gen)
            if cosine:
                c = F.normalize(c, dim=1)
            i += 1
            bar.update(1)
            due, stopping = _agree(journal, world) if i < cfg.niter else (False, False)
            if due:
                extra = {} if best is None else {"best": best}
                journal.save(redo=r, iter=i, c=c, generator=gen.get_state(), best_obj=best_obj, **extra)
                if stopping:
                    raise journal.stopped(f"in k-means restart {r + 1} of {cfg.nredo} after iteration {i}")
        _, dist = _nearest(x, c, normalize=cosine)
        obj = float(_all_sum(dist.double().sum(), world))
        bar.set_postfix(objective=f"{obj / n:.5g}")
        if obj < best_obj:
            best, best_obj = c, obj
        r, i = r + 1, 0
        if journal and r < cfg.nredo:
            journal.save(redo=r, iter=0, generator=gen.get_state(), best=best, best_obj=best_obj)
            if _agree(journal, world)[1]:
                raise journal.stopped(f"after k-means restart {r} of {cfg.nredo}")
    bar.close()
    return best


def _agree(journal: FitJournal | None, world: int) -> tuple[bool, bool]:
    """(save now, stop after saving), the same on every rank: saved when any rank's journal is due (its
    clock) or signalled, stopped when any rank was signalled."""
    if journal is None:
        return False, False
    flags = _all_sum(torch.tensor([float(journal.due()), float(journal.stopping)]), world)
    return bool(flags[0] > 0 or flags[1] > 0), bool(flags[1] > 0)


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

    x: (M, C) numpy or torch, float16 or float32; centroids: (K, C). Returns (M,) int64 (and (M,) float32
    squared distances) in the type and on the device of x.
    """
    is_np = isinstance(x, np.ndarray)
    xt = torch.from_numpy(np.ascontiguousarray(x)) if is_np else x
    ct = torch.as_tensor(centroids, dtype=torch.float32, device=xt.device)
    cosine = metric == "cosine"
    idx, dist = _nearest(xt, F.normalize(ct, dim=1) if cosine else ct, block, normalize=cosine)
    if is_np:
        idx, dist = idx.numpy(), dist.numpy()
    return (idx, dist) if return_distances else idx
