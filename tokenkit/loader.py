"""Decoding and rendering views in DataLoader workers, batched within work shards.

Batches never cross a work shard, so a shard's results are complete as soon as its last batch arrives and
every shard is computed from the same batches however many shards or ranks the job has.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from tokenkit.errors import ImageError
from tokenkit.images import SampleIndex, decode_image
from tokenkit.stopsignal import ignore_sigterm, worker_batches
from tokenkit.views import ViewConfig, draw_views, render_view, to_uint8


class ViewDataset(Dataset):
    """Item i: the V rendered views of source sample i, or the reason it was skipped.

    Returns a dict: index, error (str or None), pixels (V, S, S, 3) uint8 (normalised on the model's device by
    views.normalize), views (V, 5) int32, crc32 of the original bytes (stored, so a trainer reading the image
    again can tell it is unchanged), and data (those bytes) when keep_bytes.
    """

    def __init__(
        self,
        source: SampleIndex,
        views: ViewConfig,
        size: int,
        min_side: int,
        keep_bytes: bool = False,
        interpolation: str = "bicubic",
    ):
        self.source, self.views, self.size = source, views, size
        self.min_side, self.keep_bytes, self.interpolation = min_side, keep_bytes, interpolation

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        name = self.source.locators[i] if self.source.kind == "folder" else f"{self.source.keys[i]} (tar)"
        try:
            data = self.source.read_bytes(i)
            img = decode_image(data, name, self.min_side)
        except (ImageError, OSError) as e:
            return {"index": i, "error": str(e).splitlines()[0]}
        views = draw_views(self.views, self.source.keys[i], img.width, img.height)  # (V, 5)
        pixels = torch.stack([to_uint8(render_view(img, v, self.size, self.interpolation)) for v in views])
        item = {"index": i, "error": None, "pixels": pixels, "views": views, "crc32": zlib.crc32(data)}
        if self.keep_bytes:
            item["data"] = data
        return item


def _collate(items: list[dict]) -> tuple[list[dict], torch.Tensor | None]:
    """In the worker: the batch's items without pixels, and the pixels of its decodable items stacked into
    one (n_ok * V, S, S, 3) uint8 tensor (one shared-memory transfer per batch, not one per image)."""
    ok = [it.pop("pixels") for it in items if it["error"] is None]
    return items, torch.cat(ok) if ok else None


def iter_shard_batches(
    dataset: ViewDataset,
    shards: list[tuple[int, int, int]],
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
) -> Iterator[tuple[int, list[dict], torch.Tensor | None, bool]]:
    """Yield (shard id, items of one batch, pixels of its decodable items, is_last_batch_of_shard) over
    shards [(id, start, stop)] in order; pixels (n_ok * V, S, S, 3) uint8 or None (see _collate)."""
    plan = []  # (shard id, indices, last)
    for sid, start, stop in shards:
        for s in range(start, stop, batch_size):
            plan.append((sid, list(range(s, min(s + batch_size, stop))), s + batch_size >= stop))
    if not plan:
        return
    loader = DataLoader(
        dataset,
        batch_sampler=[p[1] for p in plan],
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_sigterm,
    )
    with worker_batches(loader) as batches:  # its workers end with the job, also on an error
        for (sid, _, last), (items, pixels) in zip(plan, batches, strict=True):
            yield sid, items, pixels, last
