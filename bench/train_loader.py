"""What one pre-training sample costs a DataLoader worker, and how many workers a GPU therefore needs.

    python bench/train_loader.py [--images 300] [--long-side 500] [--size 224] [--step-img-s 1350]

The trainer's per-sample work (pretrain.data.make_sample): decode the JPEG, render the stored view (crop box
+ flip, one bicubic resize to the student's size), to uint8, draw the colour jitter (applied to the whole
batch on the trainer's device; its cost per sample on the CPU is printed too) and the objective's draws (a
MaPeT order or a BEiT mask, and drop path, drawn in the worker; the whole sample is MaPeT's). Images: scikit-image's colour
photos resized to an ImageNet-like long side (500 px, JPEG quality 90, in memory), each with 8 stored
random-resized views as `tokenkit tokenize --views 8` draws them. Prints ms per sample for each part and
for the whole, and images/s per worker; with --step-img-s (one GPU's training images/s, e.g. MaPeT-S at
batch 128 on the H200: 128 / 0.080 s, docs/benchmarks.md) the number of worker cores one GPU needs.

Also the token store's share: a random batch read from a zarr store written by tokenkit's own writer
(--store-rows rows, V 8, 14 x 14 tokens, ImageNet-like keys), reading every per-row array from zarr (what a
trainer without it would do) against reading only the tokens with the rest held in memory
(`TokenStore.meta`, the trainer now); and the same rows from webdataset shards as `--data wds` streams
them (each tar's sample index, from its member headers or its saved `.idx.npy`, then the sample's two
members read by offset).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from pretrain.data import SampleDraws, apply_jitter, jitter_draws, make_sample
from tokenkit.images import decode_image
from tokenkit.views import ViewConfig, draw_views, keyed_rng, render_view, to_uint8, to_unit

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
DRAWS = SampleDraws(
    "mapet", depth=12
)  # MaPeT-S's: an order of the 196 patches, 2 drop-path uniforms per block
BEIT_DRAWS = SampleDraws("beit", depth=12, num_masked=75)


def jpegs(long_side: int) -> list[tuple[str, bytes, np.ndarray]]:
    """(key, JPEG bytes, (8, 5) views) per photo, the photo resized to `long_side` on its long side."""
    out = []
    for name in PHOTOS:
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        s = long_side / max(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((name, buf.getvalue(), draw_views(ViewConfig(8, "random"), name, *img.size)))
    return out


def store_read_ms(rows: int, batch: int, repeats: int) -> tuple[float, float]:
    """ms per row of a random batch: (every per-row array read from zarr, only the tokens)."""
    import tempfile

    import zarr

    from tokenkit.rowstore import create_arrays, write_shard

    shard, rng = 1024, np.random.default_rng(0)
    arrays = {"tokens": ((8, 14, 14), "uint16"), "views": ((8, 5), "int32"), "labels": ((), "int64"),
              "keys": ((), "str"), "locators": ((), "str"), "crc32": ((), "uint32")}  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        create_arrays(Path(root), rows, shard, arrays)
        for i in range(rows // shard):
            keys = np.asarray([f"n{i:08d}/n{i:08d}_{j}" for j in range(shard)])
            write_shard(Path(root), i, i * shard, {
                "tokens": rng.integers(0, 8192, (shard, 8, 14, 14)).astype(np.uint16),
                "views": rng.integers(0, 500, (shard, 8, 5)).astype(np.int32),
                "labels": np.full(shard, i, np.int64), "keys": keys,
                "locators": np.asarray([f"{k}.JPEG" for k in keys]),
                "crc32": rng.integers(0, 2**32, shard).astype(np.uint32)})  # fmt: skip
        g = zarr.open_group(root, mode="r")
        times = {"all": [], "tokens": []}
        for _ in range(repeats):
            pos = np.sort(rng.choice(rows, batch, replace=False))
            for name, names in (("all", list(arrays)), ("tokens", ["tokens"])):
                t = time.perf_counter()
                for a in names:
                    g[a].get_orthogonal_selection((pos,))
                times[name].append(1000 * (time.perf_counter() - t) / batch)
    return statistics.median(times["all"]), statistics.median(times["tokens"])


def wds_read_ms(rows: int, batch: int, repeats: int, jpeg: bytes) -> tuple[float, float, float]:
    """ms per sample of a tar's sample index, walked from its member headers and read from its saved
    `.idx.npy`, and of reading a random batch's (image bytes, token record) from token shards of 1,024
    samples by offset. Every loader worker indexes every tar its rank streams (each shuffles the same
    references), so a worker pays the index W times per sample it decodes."""
    import tempfile

    from tokenkit.wds import index_path, index_tar, load_index, pack_record, read_sample, write_tar

    shard, rng = 1024, np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        tars = []
        for i in range(rows // shard):
            tars.append(Path(root) / f"shard-{i:06d}.tar")
            write_tar(tars[-1], [
                {"key": f"n{i:08d}/n{i:08d}_{j}", "ext": "jpg", "data": jpeg,
                 "record": pack_record(rng.integers(0, 8192, (8, 14, 14)).astype(np.uint16),
                                       rng.integers(0, 500, (8, 5)).astype(np.int32), i)}
                for j in range(shard)])  # fmt: skip
        t = time.perf_counter()
        refs = [index_tar(p) for p in tars]
        headers_ms = 1000 * (time.perf_counter() - t) / rows
        t = time.perf_counter()
        assert [load_index(index_path(p)) for p in tars] == refs
        saved_ms = 1000 * (time.perf_counter() - t) / rows
        times = []
        for _ in range(repeats):
            picks = [
                (int(t), int(j))
                for t, j in zip(rng.integers(0, len(tars), batch), rng.integers(0, shard, batch), strict=True)
            ]
            t0 = time.perf_counter()
            files = {}
            for t, j in picks:
                f = files.setdefault(t, open(tars[t], "rb"))  # noqa: SIM115 - closed below
                read_sample(f, str(tars[t]), refs[t][j])
            for f in files.values():
                f.close()
            times.append(1000 * (time.perf_counter() - t0) / batch)
    return headers_ms, saved_ms, statistics.median(times)


def ms_per(fn, items, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(items[i % len(items)], i)
    return 1000 * (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="Samples timed per part.")
    ap.add_argument("--long-side", type=int, default=500)
    ap.add_argument("--size", type=int, default=224, help="Student input size.")
    ap.add_argument("--jitter", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-img-s", type=float, default=None, help="One GPU's training images/s.")
    ap.add_argument("--store-rows", type=int, default=32768, help="Rows of the synthetic token store.")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    if args.store_rows < 1024 or args.store_rows % 1024:
        ap.error(f"--store-rows {args.store_rows}: must be a positive multiple of 1024 (the shard size)")
    items = jpegs(args.long_side)
    tokens = np.zeros((8, (args.size // 16) ** 2), np.uint16)
    decoded = [decode_image(data, key) for key, data, _ in items]
    rendered = [
        render_view(img, views[0], args.size) for img, (_, _, views) in zip(decoded, items, strict=True)
    ]
    parts = {
        "decode": lambda it, i: decode_image(it[1], it[0]),
        "render view": lambda it, i: render_view(decoded[i % len(items)], it[2][i % 8], args.size),
        "to uint8": lambda it, i: to_uint8(rendered[i % len(items)]),
        "jitter draws": lambda it, i: jitter_draws(keyed_rng(i), args.jitter),
        "mapet draws": lambda it, i: DRAWS.draw(keyed_rng(i), 196),
        "beit draws": lambda it, i: BEIT_DRAWS.draw(keyed_rng(i), 196),
        "whole sample": lambda it, i: make_sample(
            it[1], it[0], it[0], tokens, it[2], i, 0, args.size, args.jitter, DRAWS
        ),
    }
    runs = {name: [] for name in parts}
    for _ in range(args.repeats):  # interleaved, so the machine's drift hits every part alike
        for name, fn in parts.items():
            runs[name].append(ms_per(fn, items, args.images))
    med = {name: statistics.median(v) for name, v in runs.items()}
    sizes = sorted({decode_image(d, k).size for k, d, _ in items})
    print(
        f"{len(items)} JPEGs, long side {args.long_side} ({', '.join(f'{w}x{h}' for w, h in sizes)}), "
        f"views 8, student {args.size} px, median of {args.repeats}:"
    )
    for name, ms in med.items():
        print(f"  {name:13s} {ms:6.2f} ms")
    batch = torch.stack([to_uint8(rendered[i % len(items)]) for i in range(args.batch_size)])
    draws = torch.stack([jitter_draws(keyed_rng(i), args.jitter) for i in range(args.batch_size)])
    t = time.perf_counter()
    for _ in range(args.repeats):
        apply_jitter(to_unit(batch), draws)
    jit = 1000 * (time.perf_counter() - t) / (args.repeats * args.batch_size)
    print(
        f"colour jitter of a batch of {args.batch_size} on this CPU (the trainer's device here): {jit:.2f} ms/sample"
    )
    every, tokens = store_read_ms(args.store_rows, args.batch_size, args.repeats)
    print(
        f"token store, random batch of {args.batch_size} of {args.store_rows} rows: every per-row array from "
        f"zarr {every:.2f} ms per row, tokens only {tokens:.2f} ms per row ({every / tokens:.1f}x)"
    )
    headers, saved, read = wds_read_ms(args.store_rows, args.batch_size, args.repeats, items[0][1])
    print(
        f"webdataset shards, same batches: image bytes + token record {read:.3f} ms per sample; each tar's "
        f"sample index {headers:.3f} ms per sample from its member headers, {saved:.3f} from its saved "
        f".idx.npy ({headers / saved:.0f}x), paid once per worker: x W per decoded sample"
    )
    per_worker = 1000 / (med["whole sample"] + tokens)
    print(
        f"one worker (sample + its tokens): {per_worker:.0f} img/s "
        f"(reading every array: {1000 / (med['whole sample'] + every):.0f} img/s)"
    )
    if args.step_img_s:
        print(
            f"workers (cores) one GPU at {args.step_img_s:.0f} img/s needs: {args.step_img_s / per_worker:.1f}"
        )


if __name__ == "__main__":
    main()
