"""Tokenize throughput / bare CLIP forward throughput, same images, batch, device (goal >= 0.85 on CPU).

    python bench/tokenize_throughput.py [--model ViT-B-16] [--grid 14] [--images 96] [--batch-size 16]
        [--workers 1] [--device auto] [--repeats 3]

The bare forward runs the encoder on pre-rendered, pre-normalised tensors (nothing else); the tokenize
figure is the whole `tokenize` job: listing, decoding and rendering in DataLoader workers, the forward,
nearest-centroid assignment against K centroids, zarr + webdataset writes and the manifest.

Each repeat runs the job twice, on the first half of the images and on all of them: the whole job's rate is
--images over its time, the steady rate is the second half's images over the difference of the two times,
so the job's fixed costs (building the model, starting the workers, the manifest) cancel; that is the rate a
dataset-sized job runs at. The input side alone (the same DataLoader workers decoding and rendering, no
model) is measured the same two ways: when its steady rate is below the bare forward, the job is bound by
the CPU's decoding, not by CLIP. It also prints the main thread's own CPU time per image (steady): on a
GPU the forward waits on the device, so this is what one process's job can do at most, whatever the GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from train_loader import PHOTOS

from tokenkit.codebook import Codebook
from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.images import decode_image, list_folder
from tokenkit.loader import ViewDataset, iter_shard_batches
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig, center_box, render_view, to_tensor


def write_images(root: Path, indices: range) -> None:
    """Distinct JPEGs of realistic size from scikit-image's colour photos (rotated, resized per index)."""
    import skimage.data
    from PIL import Image

    photos = {}
    for i in indices:
        name = PHOTOS[i % len(PHOTOS)]
        if name not in photos:
            photos[name] = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        img = photos[name].rotate(i * 7, expand=False).resize((320 + i % 5 * 16, 300))
        img.save(root / f"img_{i:05d}.jpg", quality=90)


def make_images(root: Path, n: int, processes: int) -> None:
    """write_images over `processes` processes (the setup of a GPU host's run is otherwise minutes)."""
    step = -(-n // processes)
    parts = [range(s, min(s + step, n)) for s in range(0, n, step)]
    with ProcessPoolExecutor(len(parts)) as pool:
        list(pool.map(write_images, [root] * len(parts), parts))


def half_folder(root: Path, half: Path, n: int) -> None:
    """`half` holds the first n images of `root` (hard links: the same bytes, no copy)."""
    half.mkdir()
    for f in sorted(root.iterdir())[:n]:
        os.link(f, half / f.name)


def steady_rate(images: int, seconds: float) -> float:
    """images / seconds of the second half; nan when noise made the difference of two times <= 0."""
    return images / seconds if seconds > 0 else math.nan


def median(values) -> float:
    """Median of the measurable values (nan when none is)."""
    ok = [v for v in values if not math.isnan(v)]
    return statistics.median(ok) if ok else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    spec = resolve_spec(args.model, "none", grid=args.grid)
    n, B = args.images, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        # the image-writing processes fork before this process starts CUDA or torch's threads
        make_images(tmp / "img", n, max(1, min(os.cpu_count() or 1, 16)))
        half_folder(tmp / "img", tmp / "half", n // 2)
        enc = load_encoder(spec, device)
        folders = {n // 2: tmp / "half", n: tmp / "img"}
        rng = np.random.default_rng(0)
        cb_path = tmp / "cb.safetensors"
        Codebook(
            rng.normal(size=(args.k, enc.dim)).astype(np.float32),
            spec,
            {"kmeans": {"metric": "l2"}, "sizes": [], "objective": 0.0},
        ).save(cb_path)
        # the bare forward: n images' worth of batches over (up to) two batches of pre-rendered images
        src = list_folder(tmp / "img")
        x = []
        for i in range(min(n, 2 * B)):
            img = decode_image(src.read_bytes(i))
            x.append(
                to_tensor(render_view(img, (*center_box(*img.size), 0), spec.image_size), spec.mean, spec.std)
            )
        x = torch.stack(x).to(device)  # (R, 3, S, S)
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare_forward() -> float:
            with ac:
                enc(x[:B])  # warm-up
            sync()
            t = time.perf_counter()
            with ac:
                for s in range(0, n, B):
                    r = s % len(x)
                    enc(x[r : r + min(B, n - s)])
            sync()
            return time.perf_counter() - t

        cfg = TokenizeConfig(
            views=ViewConfig(1, "center"),
            format="both",
            shard_size=1024,
            batch_size=B,
            workers=args.workers,
            device=str(device),
        )

        def job(m: int, r: int) -> tuple[float, float]:
            """(wall seconds, CPU seconds of the main thread) of one tokenize job over the first m images."""
            c, t = time.thread_time(), time.perf_counter()
            tokenize(folders[m], cb_path, tmp / f"tok{r}-{m}", cfg, progress=False)
            return time.perf_counter() - t, time.thread_time() - c

        def input_side(m: int) -> float:
            s = list_folder(folders[m])
            ds = ViewDataset(s, cfg.views, spec.image_size, min_side=args.grid, keep_bytes=True)
            t = time.perf_counter()
            for _ in iter_shard_batches(ds, [(0, 0, m)], B, args.workers, device.type == "cuda"):
                pass
            return time.perf_counter() - t

        rows = []
        for r in range(args.repeats):  # alternate them: a shared machine's speed drifts by +-15%
            bare = n / bare_forward()
            (t_half, c_half), (t_all, c_all) = job(n // 2, r), job(n, r)
            whole, steady = n / t_all, steady_rate(n - n // 2, t_all - t_half)
            main_ms = 1e3 * (c_all - c_half) / (n - n // 2)
            i_half, i_all = input_side(n // 2), input_side(n)
            rows.append((bare, whole, steady, n / i_all, steady_rate(n - n // 2, i_all - i_half), main_ms))
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {name}; model {args.model} {spec.image_size}px grid {args.grid}, K {args.k}, batch {B}, "
        f"{n} images (and their first {n // 2}), {args.workers} workers"
    )
    for i, (bare, whole, steady, i_whole, i_steady, main_ms) in enumerate(rows):
        print(
            f"repeat {i}: bare CLIP forward {bare:.1f} img/s | tokenize job {whole:.1f} img/s whole, {steady:.1f} "
            f"steady | input side alone {i_whole:.1f} img/s whole, {i_steady:.1f} steady | ratio job / bare "
            f"{whole / bare:.3f} whole, {steady / bare:.3f} steady | main thread's CPU {main_ms:.3f} ms/img steady"
        )
    med = [median(row[j] / row[0] for row in rows) for j in (1, 2)]
    inp, main_ms = (median(row[j] for row in rows) for j in (4, 5))
    print(
        f"median ratio tokenize / bare forward: {med[0]:.3f} whole job, {med[1]:.3f} steady (goal >= 0.85); "
        f"input side alone, steady: {inp:.1f} img/s; the job's main thread: {main_ms:.3f} ms of CPU per image "
        + (f"(a ceiling of {1e3 / main_ms:.0f} img/s for one process)" if main_ms > 0 else "(not measurable)")
    )
    if any(math.isnan(row[j]) for row in rows for j in (2, 4)):
        print("nan: the second half took no longer than the first (fixed costs dominate); use more --images")


if __name__ == "__main__":
    main()
