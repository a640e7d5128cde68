"""What an image listing costs each DataLoader worker: Python strings in tuples against tokenkit's StrArray.

    python bench/worker_memory.py [--images 1281167] [--workers 4] [--epoch-share 1.0]

A listing of ImageNet's size (keys and relative paths shaped like ImageNet's, e.g. n01440764/n01440764_10026
and n01440764/n01440764_10026.JPEG) is built once in the main process, as `tokenkit.images.list_folder`
builds a `SampleIndex`; a torch DataLoader with --workers forked workers then reads each sample's key and
path, as the fine-tuning, evaluation and tokenize datasets do, for --epoch-share of an epoch. Each worker
reports its private memory (Private_Clean + Private_Dirty in /proc/self/smaps_rollup: pages it no longer
shares with the main process) before and after. Strings kept as Python objects in tuples are copied into
every worker page by page as their reference counts change; a StrArray's two numpy arrays are not. Linux
only (reads /proc).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenkit.images import StrArray  # noqa: E402


def private_mib() -> float:
    kib = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean", "Private_Dirty")):
                kib += int(line.split()[1])
    return kib / 1024


class Listing(Dataset):
    """Reads sample i's key and path, as the training and evaluation datasets do; returns nothing else."""

    def __init__(self, keys, paths):
        self.keys, self.paths = keys, paths
        self.start = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitems__(self, idx: list[int]):
        if self.start is None:
            self.start = private_mib()
        n = sum(len(self.keys[i]) + len(self.paths[i]) for i in idx)
        info = torch.utils.data.get_worker_info()
        return [(info.id, self.start, private_mib(), n)]


def measure(keys, paths, workers: int, share: float, seed: int = 0) -> dict[int, tuple[float, float]]:
    """{worker: (private MiB at its first batch, at its last)}."""
    order = np.random.default_rng(seed).permutation(len(keys))[: int(share * len(keys))].tolist()
    batches = [order[i : i + 1024] for i in range(0, len(order), 1024)]
    loader = DataLoader(
        Listing(keys, paths), batch_sampler=batches, num_workers=workers, collate_fn=lambda b: b[0]
    )
    out = {}
    for wid, start, now, _ in loader:
        out[wid] = (start, now)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epoch-share", type=float, default=1.0)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    syn = rng.integers(1_000_000, 16_000_000, a.images)
    keys = [f"n{s:08d}/n{s:08d}_{i}" for i, s in enumerate(syn)]
    paths = [k + ".JPEG" for k in keys]
    print(f"{a.images} keys and paths, {a.workers} workers, {a.epoch_share:g} of an epoch")
    rows = {}
    for name, (k, p) in {
        "tuple of str": (tuple(keys), tuple(paths)),
        "StrArray": (StrArray(keys), StrArray(paths)),
    }.items():
        got = measure(k, p, a.workers, a.epoch_share)
        growth = [now - start for start, now in got.values()]
        rows[name] = float(np.mean(growth))
        print(f"  {name:13s} private memory gained per worker: {rows[name]:7.1f} MiB "
              f"(min {min(growth):.1f}, max {max(growth):.1f})")  # fmt: skip
    print(f"  tuple / StrArray: {rows['tuple of str'] / max(rows['StrArray'], 0.1):.1f}x")


if __name__ == "__main__":
    main()
