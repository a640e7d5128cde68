"""The trainer's data (pretrain/data.py): the stored view of each epoch, the keyed draws, the sampler's split of the ranks, streamed shards, loader workers."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import EpochSampler, SampleDraws, StoreDataset, to_input
from tests.runs import DRAWS, training_store
from tokenkit.store import TokenStore
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig, keyed_rng

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos, codebook_path):
    return training_store(tmp_path_factory.mktemp("train") / "tokens", photos, codebook_path)


def test_store_dataset_renders_the_stored_view_of_the_epoch(store):
    from tokenkit.store import TokenStore
    from tokenkit.views import render_view

    ds = StoreDataset(store, image_size=64, draws=DRAWS, seed=5, jitter=0.0)
    s = TokenStore.open(store)
    orders, drops = [], []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        x, y, draws, order, drop = ds[3]
        block = s.read([3])
        v = int(keyed_rng(5, epoch, block["keys"][0]).integers(0, 2))
        assert torch.equal(y, torch.from_numpy(block["tokens"][0, v].reshape(-1)))
        want = render_view(s.image(3), block["views"][0, v], 64)
        assert x.dtype == torch.uint8 and x.shape == (64, 64, 3)
        assert torch.equal(x, torch.from_numpy(np.array(want)))  # exactly the stored view's pixels
        assert torch.equal(to_input(x[None], "cpu", draws[None]), to_input(x[None], "cpu"))  # no jitter
        orders.append(order)
        drops.append(drop)
        assert sorted(order.tolist()) == list(range(16)) and drop.shape == (4, 2)  # mapet_micro: 4 blocks
        again = ds[3]
        assert torch.equal(again[3], order) and torch.equal(again[4], drop)  # keyed by (seed, epoch, key)
    assert not torch.equal(*orders) and not torch.equal(*drops)  # and drawn afresh each epoch


def test_beit_draws_are_blockwise_masks_within_their_budget():
    masks = [SampleDraws("beit", depth=3, num_masked=75).draw(keyed_rng("m", i), 196) for i in range(200)]
    sizes = torch.stack([m.sum() for m, _ in masks])
    assert all(m.dtype == torch.bool and m.shape == (196,) and d.shape == (3, 2) for m, d in masks)
    assert int(sizes.max()) <= 75 and float(sizes.float().mean()) > 70  # BEiT's 75 of 196, never more


def test_jitter_is_colorjitter_with_keyed_draws_in_a_random_order():
    """torchvision's ColorJitter(0.4, 0.4, 0.4) on tensors: brightness, contrast and saturation factors in
    [0.6, 1.4], applied in a random order (all six orders occur), each draw from the sample's keyed
    generator; the whole batch at once on the device (here the CPU), each sample as torchvision does it."""
    import skimage.data
    from torchvision.transforms import functional as TF

    from pretrain.data import apply_jitter, jitter_draws
    from tokenkit.views import to_unit

    photo = torch.from_numpy(skimage.data.astronaut()[::10, ::10].copy())  # (52, 52, 3) uint8
    batch = torch.stack([photo.roll(7 * i, dims=0) for i in range(60)])  # (60, 52, 52, 3)
    draws = torch.stack([jitter_draws(keyed_rng("j", key), 0.4) for key in range(60)])  # (60, 3, 2)
    got = apply_jitter(to_unit(batch), draws)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    orders = set()
    for key in range(60):
        rng = keyed_rng("j", key)
        want = to_unit(batch[key : key + 1])[0]
        order = tuple(int(i) for i in rng.permutation(3))
        for i in order:
            want = ops[i](want, float(np.float32(rng.uniform(0.6, 1.4))))
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)
        orders.add(order)
    assert len(orders) == 6
    assert (got - to_unit(batch)).abs().mean() > 0.02  # it does change the pixels
    identity = torch.stack([jitter_draws(keyed_rng("j", 0), 0.0)] * 60)
    assert torch.equal(apply_jitter(to_unit(batch), identity), to_unit(batch))


def test_sampler_splits_ranks_disjointly_and_resumes_mid_epoch():
    a = EpochSampler(103, 5, rank=0, world=2, seed=1)
    b = EpochSampler(103, 5, rank=1, world=2, seed=1)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 50 and not set(ia) & set(ib)
    a.set_epoch(0, start_batch=3)
    assert list(a) == ia[15:]
    a.set_epoch(1)
    assert list(a) != ia


def test_every_split_of_the_global_batch_takes_the_same_images_per_step():
    """(batch, accumulation, ranks) with one product: each optimizer step's images, over its micro-steps and
    ranks, are the same set, also from a mid-epoch start, so a run resumed on other GPUs keeps its data order."""

    def steps(batch, accum, world, start=0):
        ranks = []
        for r in range(world):
            s = EpochSampler(50, batch, r, world, seed=2)
            s.set_epoch(1, start * accum)
            ranks.append(list(s))
        per = batch * accum
        return [
            sorted(i for ids in ranks for i in ids[k * per : (k + 1) * per])
            for k in range(len(ranks[0]) // per)
        ]

    want = steps(8, 1, 1)
    assert len(want) == 6 and len({i for s in want for i in s}) == 48
    for split in [(4, 2, 1), (2, 2, 2), (1, 2, 4), (4, 1, 2), (1, 8, 1)]:
        assert steps(*split) == want, split
    assert steps(2, 1, 4, start=2) == want[2:]


def test_streamed_workers_read_only_their_own_batches(store, monkeypatch):
    """Each worker shuffles header-only references and reads the payload of its own batches alone."""
    import pretrain.data as data

    reads = []
    real = data.read_sample
    monkeypatch.setattr(data, "read_sample", lambda f, path, ref: reads.append(ref.key) or real(f, path, ref))
    ds = data.StreamDataset(
        store, 64, batch_size=2, batches_per_epoch=6, draws=DRAWS, seed=1, jitter=0.4, buffer=4
    )
    everything = [(x.sum().item(), y.tolist(), j.tolist()) for x, y, j, _, _ in ds]
    assert len(reads) == 12
    reads.clear()

    class Worker:
        id, num_workers = 1, 3

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Worker)
    mine = [(x.sum().item(), y.tolist(), j.tolist()) for x, y, j, _, _ in ds]
    assert mine == everything[1::3] and len(reads) == 2 * 2  # batches 1 and 4, two samples each


def test_streamed_workers_read_saved_tar_indexes(store, monkeypatch):
    """Workers take each tar's sample list from its saved index, not from a walk over its member headers."""
    import pretrain.data as data
    import tokenkit.wds as wds

    walks = []
    real = wds.index_tar
    monkeypatch.setattr(wds, "index_tar", lambda p: walks.append(p) or real(p))
    ds = data.StreamDataset(
        store, 64, batch_size=2, batches_per_epoch=5, draws=DRAWS, seed=1, jitter=0.4, buffer=4
    )
    assert len([x for x, *_ in ds]) == 5 and walks == []


def test_streamed_workers_keep_few_tars_open(photos, codebook_path, tmp_path, monkeypatch):
    """An epoch streams from every shard (ImageNet: ~1,250 tars, over the usual limit of 1,024 open files per
    process): a worker keeps at most MAX_OPEN_TARS open, closing the least recently read, with the same
    batches as with every tar open."""

    import pretrain.data as data

    cfg = TokenizeConfig(views=ViewConfig(1, "center"), format="wds", shard_size=1, workers=0)
    store = tokenize(photos, codebook_path, tmp_path / "tokens", cfg, progress=False)
    assert len(TokenStore.open(store).tar_paths()) == 12
    fds = []
    real = data.read_sample
    monkeypatch.setattr(
        data,
        "read_sample",
        lambda f, path, ref: fds.append(len(os.listdir("/proc/self/fd"))) or real(f, path, ref),
    )

    def run(limit):
        monkeypatch.setattr(data, "MAX_OPEN_TARS", limit)
        fds.clear()
        base = len(os.listdir("/proc/self/fd"))
        ds = data.StreamDataset(
            store, 64, batch_size=3, batches_per_epoch=8, draws=DRAWS, seed=1, jitter=0.4, buffer=4
        )
        out = [(x.sum().item(), y.tolist(), j.tolist()) for x, y, j, _, _ in ds]
        assert len(os.listdir("/proc/self/fd")) == base  # all closed at the end
        return out, max(fds) - base

    everything, most_all = run(100)
    few, most_few = run(2)
    assert few == everything
    assert most_few <= 2 < most_all


def test_an_error_in_a_loader_worker_ends_the_process(tmp_path, photos, codebook_path):
    """A source image changed since tokenizing, met by a loader worker mid-epoch: `mapet pretrain` prints the
    one-line error and the process ends with exit 2. Its workers ignore SIGTERM (preemption), so a worker
    left to interpreter exit (kept alive by the error's traceback) would keep it waiting forever."""
    import shutil

    from PIL import Image

    src = shutil.copytree(photos, tmp_path / "photos")
    tokens = tokenize(src, codebook_path, tmp_path / "tokens", TokenizeConfig(workers=0), progress=False)
    store = TokenStore.open(tokens)
    last = store.read([len(store) - 1])["locators"][0]  # not the first image: a worker meets it
    Image.open(src / last).save(src / last, "JPEG", quality=50)
    args = ["pretrain", "--tokens", str(tokens), "--out", str(tmp_path / "run"), "--model", "mapet_micro",
            "--image-size", "64", "--batch-size", "2", "--epochs", "1", "--lr", "1e-3", "--warmup-epochs", "0.5",
            "--workers", "2", "--quiet"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "cli.mapet", *args], capture_output=True, timeout=120)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and f"'{last}' changed since it was tokenized" in err, err[-2000:]
    # one line of ours (an old dependency may add its own warnings before it), no traceback
    assert err.splitlines()[-1].startswith("mapet: error: ")
    assert err.count("mapet: ") == 1 and "Traceback" not in err
