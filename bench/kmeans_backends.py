"""k-means backends side by side: faiss (GPU when it has GPUs, else CPU) and the torch backend (bf16 on CUDA).

    python bench/kmeans_backends.py [--n 200000] [--dim 768] [--k 1024 8192] [--niter 10] [--device auto]

Same data (a seeded Gaussian mixture with anisotropic noise, like CLIP patch features), same k, iterations
and seed. Prints seconds per fit, the objective of each and the torch / faiss objective ratio (the project's
promise: within 1%).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tokenkit.kmeans import KMeansConfig, fit


def features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4096, dim)).astype(np.float32)
    scale = np.linspace(0.3, 1.5, dim, dtype=np.float32)
    x = centers[rng.integers(0, len(centers), n)] * 0.5
    x += rng.normal(size=(n, dim)).astype(np.float32) * scale
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--device", default="auto", help="device of the torch backend")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    x = features(args.n, args.dim)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"{args.n} x {args.dim} float32, {args.niter} iterations, torch backend on {name}")
    for k in args.k:
        cfg = dict(k=k, niter=args.niter, nredo=1, seed=0, max_points_per_centroid=args.n)
        row = {}
        # torch first: its figure prints even if a slow faiss run is cut off
        for backend in ("torch", "faiss"):
            t = time.perf_counter()
            r = fit(x, KMeansConfig(backend=backend, **cfg), device=device if backend == "torch" else None)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row[backend] = (time.perf_counter() - t, r.objective)
            print(f"  k={k}: {r.backend} {row[backend][0]:.1f} s (objective {r.objective:.4f})", flush=True)
        (tf, of), (tt, ot) = row["faiss"], row["torch"]
        print(
            f"  k={k}: objective torch / faiss {ot / of:.4f} (goal within 1%) | time faiss / torch {tf / tt:.2f}x"
        )


if __name__ == "__main__":
    main()
