"""The trainer's data path: stored views re-rendered exactly, photometric jitter on the input only, cached
targets. CLIP never runs here.

For each sample and epoch the view is a deterministic function of (seed, epoch, key); its crop box and flip
come from the store and are rendered by tokenkit's own `render_view`, so the input shows exactly the pixels
the targets were computed from, at the student's resolution. Colour jitter (brightness, contrast,
saturation) is drawn from the same keyed generator in the worker and applied on the trainer's device to the
whole batch (`apply_jitter`): workers ship uint8 pixels (B, S, S, 3), 4x fewer bytes than float32, and each
sample's jitter draws (B, 3, 2); the trainer converts, jitters and normalises them on its device. The
objective's own draws (MaPeT orders or BEiT masks, drop path) come from the same generator (SampleDraws).

Two readers: `StoreDataset` (map-style over a zarr store: each batch's token rows in one read through
`__getitems__`, the per-row metadata held in memory (`TokenStore.meta`), each source image checked against
its stored crc32; `EpochSampler` for shuffling and DDP sharding) and `StreamDataset` (webdataset shards
with the image bytes inside, resampled per rank and epoch so every rank gets equal work).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset, Sampler

from pretrain.beit import block_mask
from pretrain.vit import drop_path_draws
from tokenkit.images import decode_image
from tokenkit.store import TokenStore
from tokenkit.views import keyed_rng, render_view, standardize, to_uint8, to_unit
from tokenkit.wds import SampleRef, load_index, read_sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_input(pixels: torch.Tensor, device, draws: torch.Tensor | None = None) -> torch.Tensor:
    """A loader batch (B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised on `device` (every pretrain,
    evaluation and fine-tuning loader ships uint8 pixels), colour-jittered first when `draws` (B, 3, 2) are
    given (pre-training)."""
    x = to_unit(pixels.to(device, non_blocking=True))  # (B, 3, S, S) in [0, 1]
    if draws is not None:
        x = apply_jitter(x, draws.to(device, non_blocking=True))
    return standardize(x, IMAGENET_MEAN, IMAGENET_STD)


BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def jitter_draws(rng: np.random.Generator, strength: float) -> torch.Tensor:
    """One sample's colour jitter, torchvision's ColorJitter(strength, strength, strength): (3, 2) float32
    rows (op, factor) in the order of application, a random order of brightness, contrast and saturation,
    each factor uniform in [1 - strength, 1 + strength]. strength 0 gives factors 1, the identity."""
    out = np.ones((3, 2), np.float32)
    out[:, 0] = BRIGHTNESS, CONTRAST, SATURATION
    if strength > 0:
        for k, op in enumerate(rng.permutation(3)):
            out[k] = op, rng.uniform(1 - strength, 1 + strength)
    return torch.from_numpy(out)


def apply_jitter(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """x (B, 3, S, S) float in [0, 1], jittered in place by draws (B, 3, 2) from jitter_draws; each op as
    torchvision's tensor adjust_brightness / adjust_contrast / adjust_saturation: a blend with black, the
    grey mean, or the grey image, clamped to [0, 1]."""
    B, _, S, _ = x.shape
    grey_w = torch.tensor([[0.2989, 0.587, 0.114]], dtype=x.dtype, device=x.device)  # (1, 3)
    for k in range(draws.shape[1]):
        op = draws[:, k, 0].round().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        f = draws[:, k, 1].to(x.dtype).view(-1, 1, 1, 1)
        grey = torch.matmul(grey_w, x.reshape(B, 3, -1)).view(B, 1, S, S)
        other = torch.where(
            op == SATURATION, grey, torch.where(op == CONTRAST, grey.mean((2, 3), keepdim=True), 0.0)
        )  # (B, 1, S, S): what the op blends with
        x.mul_(f).add_(other.mul_(1 - f)).clamp_(0, 1)
    return x


@dataclass(frozen=True)
class SampleDraws:
    """What a sample draws for its objective, after its view and jitter, from the same generator keyed by
    (seed, epoch, key): MaPeT's factorisation order (a uniform permutation of the G*G patches, paper
    Sec. 3.1) or BEiT's blockwise mask of at most `num_masked` patches, and 2 drop-path uniforms per block
    (attention, MLP; kept where u < 1 - rate). Keyed by the sample, not by rank or micro-step, a step
    computes the same function for any split of its global batch over GPUs and accumulation steps, and the
    draws run in the loader's workers, off the training loop."""

    objective: str  # "mapet" | "beit"
    depth: int  # the encoder's blocks
    num_masked: int = 0  # BEiT's mask budget

    def draw(self, rng: np.random.Generator, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G*G,) int64 order or (G*G,) bool mask, and (depth, 2) float32 drop-path uniforms."""
        if self.objective == "mapet":
            # int64, gather's index dtype, whatever numpy's default int is
            aux = torch.from_numpy(rng.permutation(num_patches).astype(np.int64))  # (G*G,)
        else:
            grid = math.isqrt(num_patches)
            aux = torch.from_numpy(block_mask(rng, grid, self.num_masked).reshape(-1))  # (G*G,) bool
        return aux, drop_path_draws(rng, self.depth)


def make_sample(
    data: bytes,
    name: str,
    key: str,
    tokens: np.ndarray,
    views: np.ndarray,
    epoch: int,
    seed: int,
    image_size: int,
    strength: float,
    draws: SampleDraws,
) -> tuple[torch.Tensor, ...]:
    """One training sample: (S, S, 3) uint8 pixels of the view used this epoch, its (G*G,) int64 targets,
    its (3, 2) colour jitter draws (applied on the trainer's device: `to_input`), and its objective's draws
    (SampleDraws: order or mask (G*G,), drop path (depth, 2))."""
    rng = keyed_rng(seed, epoch, key)
    v = int(rng.integers(0, len(views)))
    x = to_uint8(render_view(decode_image(data, name), views[v], image_size))  # (S, S, 3)
    targets = torch.from_numpy(np.asarray(tokens[v], dtype=np.int64).reshape(-1))  # (G*G,)
    jitter = jitter_draws(rng, strength)
    return x, targets, jitter, *draws.draw(rng, len(targets))


class StoreDataset(torch.utils.data.Dataset):
    """Map-style dataset over a zarr token store. Opens the store lazily in each worker process."""

    def __init__(
        self,
        store: TokenStore | str | Path,
        image_size: int,
        draws: SampleDraws,
        seed: int = 0,
        jitter: float = 0.4,
        source_root: str | None = None,
    ):
        self.store = store if isinstance(store, TokenStore) else TokenStore.open(store)
        self.image_size, self.draws, self.seed, self.strength = image_size, draws, seed, jitter
        self.source_root = source_root
        self.epoch = 0
        self.store.meta()  # read once here, before the workers start: they share it (TokenStore.meta)
        self.length = len(self.store)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, ...]]:
        block = self.store.read(positions)  # one sorted read per array for the whole batch
        out = []
        for j in range(len(positions)):
            data = self.store.block_source(block, j, self.source_root)
            key = block["keys"][j]
            out.append(
                make_sample(
                    data,
                    key,
                    key,
                    block["tokens"][j],
                    block["views"][j],
                    self.epoch,
                    self.seed,
                    self.image_size,
                    self.strength,
                    self.draws,
                )
            )
        return out

    def __getitem__(self, pos: int):
        return self.__getitems__([pos])[0]


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, starting at `start_batch` (for exact resume).

    Each rank gets batches_per_epoch * batch_size positions (the tail that does not fill a global batch is
    dropped), so every rank runs the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.batches_per_epoch = n // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} samples cannot fill one batch of {batch_size} x {world} ranks")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        perm = keyed_rng("sampler", self.seed, self.epoch).permutation(self.n)
        per_rank = self.batches_per_epoch * self.batch_size
        mine = perm[: per_rank * self.world][self.rank :: self.world]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


MAX_OPEN_TARS = 16  # per loader worker


class OpenTars:
    """At most `limit` tars open at once, the least recently read closed first. An epoch streams from every
    shard (ImageNet at 1,024 images per shard: ~1,250 tars), more than a process's usual limit of 1,024 open
    files, while the shuffle buffer holds samples of the last few tars only, so a few open files suffice."""

    def __init__(self, paths: list[str], limit: int):
        self.paths, self.limit = paths, limit
        self.files: OrderedDict[int, BinaryIO] = OrderedDict()

    def __getitem__(self, t: int) -> BinaryIO:
        f = self.files.pop(t, None)
        if f is None:
            if len(self.files) >= self.limit:
                self.files.popitem(last=False)[1].close()
            f = open(self.paths[t], "rb")
        self.files[t] = f  # now the most recently read
        return f

    def __enter__(self) -> OpenTars:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


class StreamDataset(IterableDataset):
    """webdataset token shards, streamed: yields whole batches (pixels (b, S, S, 3) uint8, targets (b, G*G),
    jitter draws (b, 3, 2), orders or masks (b, G*G), drop-path draws (b, depth, 2): make_sample).

    Per (epoch, rank) a keyed generator draws `len(shards)` shards with replacement (resampled shards: every
    rank streams the same amount whatever the shard sizes), a shuffle buffer mixes samples, and each
    DataLoader worker w takes batches start + w, start + w + W, ... so the batch sequence is the same for any
    worker count: every worker shuffles the same stream of sample references, read from each tar's saved
    index (`.idx.npy`, one small read; older stores: its member headers), and reads from disk and decodes
    only its own batches, so W workers read the data once, not W times. `start_batch` skips
    already-consumed batches without reading them.
    """

    def __init__(
        self,
        root,
        image_size: int,
        batch_size: int,
        batches_per_epoch: int,
        draws: SampleDraws,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        jitter: float = 0.4,
        buffer: int = 1000,
    ):
        store = TokenStore.open(root)
        self.tars = [str(p) for p in store.tar_paths()]
        self.indexes = store.tar_indexes()
        if not self.tars:
            raise ValueError(
                f"{root}: the store has no webdataset shards; tokenize with --format wds or both"
            )
        self.image_size, self.batch_size, self.batches_per_epoch = image_size, batch_size, batches_per_epoch
        self.draws = draws
        self.rank, self.world, self.seed, self.strength, self.buffer = rank, world, seed, jitter, buffer
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _refs(self) -> Iterator[tuple[int, SampleRef]]:
        """The epoch's shuffled stream of (tar number, sample reference): drawn from the tars' indexes only."""
        rng = keyed_rng("stream", self.seed, self.epoch, self.rank)
        buf: list[tuple[int, SampleRef]] = []
        while True:
            for t in rng.integers(0, len(self.tars), len(self.tars)):
                for ref in load_index(self.indexes[t]):
                    buf.append((int(t), ref))
                    if len(buf) >= self.buffer:
                        yield buf.pop(int(rng.integers(0, len(buf))))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        refs = self._refs()
        with OpenTars(self.tars, MAX_OPEN_TARS) as opened:
            for b in range(self.batches_per_epoch):
                batch = [next(refs) for _ in range(self.batch_size)]  # every worker walks the same references
                if b < self.start_batch or (b - self.start_batch) % nw != wid:
                    continue  # the DataLoader takes workers round-robin from worker 0
                pairs = []
                for t, ref in batch:  # only this worker's batches are read from disk and decoded
                    s = read_sample(opened[t], self.tars[t], ref)
                    pairs.append(
                        make_sample(
                            s["data"],
                            s["key"],
                            s["key"],
                            s["tokens"],
                            s["views"],
                            self.epoch,
                            self.seed,
                            self.image_size,
                            self.strength,
                            self.draws,
                        )
                    )
                yield tuple(torch.stack(t) for t in zip(*pairs, strict=True))


def random_orders(batch: int, num_patches: int, generator: torch.Generator) -> torch.Tensor:
    """(B, G*G) int64: a fresh uniform permutation of the patch indices per sample, from a torch generator
    (tests and benchmarks; the trainer's loader draws each sample's order keyed by the sample: SampleDraws)."""
    return torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
