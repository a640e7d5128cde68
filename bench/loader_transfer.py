"""What moving images from DataLoader workers to the main process costs, per image.

    python bench/loader_transfer.py [--workers 2] [--images 4096] [--batch-size 64] [--size 224]

Workers return ready-made tensors (no decoding, nothing else), so the figure is the transfer alone: every
tensor a worker returns crosses into the main process through its own shared-memory segment. Two ways:
- per image, float32 (3, S, S): one segment per image, 602 KB each at 224 px (what a loader that ships
  normalised images does);
- per batch, uint8 (B, S, S, 3): one segment per batch, 4x fewer bytes (the loaders now: tokenkit.loader,
  pretrain.data, evaluation, fine-tuning), normalised on the model's device afterwards.
Prints images/s for each: the ceiling the transfer puts on a job, whatever the model's speed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset


class Ready(Dataset):
    def __init__(self, n: int, size: int, batched_uint8: bool):
        self.n, self.size, self.batched_uint8 = n, size, batched_uint8

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.batched_uint8:
            return torch.full((self.size, self.size, 3), i % 251, dtype=torch.uint8)
        return torch.full((3, self.size, self.size), float(i % 251))


def per_image(items: list[torch.Tensor]) -> list[torch.Tensor]:
    return items  # each tensor travels on its own


def per_batch(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)  # stacked in the worker: one tensor travels


def rate(args, batched_uint8: bool) -> float:
    loader = DataLoader(
        Ready(args.images, args.size, batched_uint8),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=per_batch if batched_uint8 else per_image,
        prefetch_factor=4 if args.workers else None,  # torch refuses a prefetch factor without workers
    )
    t, n = time.perf_counter(), 0
    for batch in loader:
        x = batch if batched_uint8 else torch.stack(batch)  # what the consumer needs: one batch tensor
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    old, new = rate(args, False), rate(args, True)
    print(
        f"{args.workers} workers, batch {args.batch_size}, {args.size} px, {args.images} images: "
        f"float32 per image {old:.0f} img/s, uint8 per batch {new:.0f} img/s ({new / old:.1f}x)"
    )


if __name__ == "__main__":
    main()
