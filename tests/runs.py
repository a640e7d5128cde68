"""Helpers of the trainer and evaluation tests: a tiny pre-training config and run, their token store, a
folder of two separable classes, the evaluation flags, mapet_micro's loader draws."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.data import SampleDraws
from pretrain.train import TrainConfig, pretrain
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig

DRAWS = SampleDraws("mapet", depth=4)  # mapet_micro's


def tiny(store, out, **kw):
    base = dict(
        tokens=str(store),
        out=str(out),
        model="mapet_micro",
        image_size=64,
        patch_size=16,
        batch_size=4,
        epochs=4,
        warmup_epochs=1,
        lr=1e-3,
        workers=0,
        log_every=1,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def training_store(out: Path, photos: Path, codebook_path: Path) -> Path:
    """The token store the trainer tests train on: the test photos, 2 random views each, zarr and tars."""
    cfg = TokenizeConfig(views=ViewConfig(2, "random", seed=3), format="both", shard_size=8, workers=0)
    return tokenize(photos, codebook_path, out, cfg, progress=False)


def separable_folder(root, n_per_class=12, seed=0):
    """Two classes that differ in colour and texture: warm horizontal stripes vs cool vertical stripes."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls, (base, axis) in {"warm": ((200, 80, 40), 0), "cool": ((40, 90, 200), 1)}.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                a = np.zeros((72, 80, 3), np.float64) + base
                stripes = (np.arange(72 if axis == 0 else 80) // 6 % 2) * 50.0
                a += stripes[:, None, None] if axis == 0 else stripes[None, :, None]
                a += rng.normal(0, 25, a.shape)
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{cls}_{i}.png")
    return root


def eval_args(data, checkpoint="random"):
    """k-NN / linear-probe flags for a separable_folder: a random-init micro ViT at 64 px unless a checkpoint."""
    model = ["--model", "mapet_micro", "--image-size", "64"] if checkpoint == "random" else []
    return ["--checkpoint", str(checkpoint), *model, "--train", str(data / "train"), "--val", str(data / "val"),
            "--workers", "0", "--quiet"]  # fmt: skip


def pretrained_run(root: Path, photos: Path, codebook_path: Path) -> Path:
    """RUN/last.pt of one epoch of mapet_micro at 64 px on the test photos (center views)."""
    tokens = tokenize(
        photos, codebook_path, root / "tokens", TokenizeConfig(shard_size=8, workers=0), progress=False
    )
    cfg = TrainConfig(
        tokens=str(tokens),
        out=str(root / "run"),
        model="mapet_micro",
        image_size=64,
        batch_size=4,
        epochs=1,
        workers=0,
    )
    return pretrain(cfg, progress=False)


def ft_args(data, out, *extra):
    return ["finetune", *eval_args(data), "--out", str(out), "--batch-size", "8", "--lr", "1e-3",
            "--warmup-epochs", "1", *extra]  # fmt: skip
