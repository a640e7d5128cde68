"""A fixed CPU pre-training run and a fixed fine-tuning run, recorded: their loss sequences and final weights
must not change when the training code is reorganised (tests/golden_runs.json). The runs read images through
Pillow, whose resampling changed in Pillow 13 (a few pixels move by one level), so the record holds one entry
per rendering: the fingerprint of what Pillow makes of a fixed image. Record a new rendering, or every
rendering after a change meant to alter the computation, with GOLDEN_WRITE=1 pytest tests/test_golden_runs.py
(from a commit whose runs match the record)."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from cli.mapet import main as mapet_main
from pretrain.checkpoint import FINETUNE_KIND, load_checkpoint
from pretrain.finetune import TrainDataset
from pretrain.train import TrainConfig, pretrain
from tests.runs import separable_folder
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig, render_view

RECORD = Path(__file__).with_name("golden_runs.json")


def rendering() -> str:
    """The fingerprint of the image library's arithmetic: the views' crop-and-resize and the fine-tuning
    augmentations applied to a fixed random image."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 120, 3), dtype=np.uint8))
    h = hashlib.sha256()
    for box in [(3, 5, 87, 75, 0), (10, 0, 50, 96, 1), (0, 0, 120, 96, 0)]:
        h.update(np.asarray(render_view(img, box, 64)).tobytes())
    augment = TrainDataset(None, 64, randaug=True, depth=1).tf
    with torch.random.fork_rng(devices=[]):
        for seed in range(16):
            torch.manual_seed(seed)
            h.update(augment(img).numpy().tobytes())
    return h.hexdigest()[:16]


def summary(state: dict) -> dict:
    """Each weight tensor's sum and sum of squares (float64): any change to a weight moves them."""
    return {k: [float(v.double().sum()), float(v.double().square().sum())] for k, v in sorted(state.items())}


def runs(tmp_path, photos, codebook_path) -> dict:
    cfg = TokenizeConfig(views=ViewConfig(2, "random", seed=3), format="zarr", shard_size=8, workers=0)
    store = tokenize(photos, codebook_path, tmp_path / "tokens", cfg, progress=False)
    out = {}
    for objective in ("mapet", "beit"):
        run = tmp_path / objective
        pretrain(
            TrainConfig(
                tokens=str(store), out=str(run), model="mapet_micro", image_size=64, patch_size=16, batch_size=4,
                epochs=2, warmup_epochs=1, lr=1e-3, workers=0, log_every=1, seed=0, objective=objective,
            ),
            progress=False,
        )  # fmt: skip
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        out[objective] = {
            "losses": [r["loss"] for r in lines],
            "weights": summary(load_checkpoint(run / "last.pt")["model"]),
        }
    data = separable_folder(tmp_path / "data", n_per_class=8)
    ft = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(tmp_path / "mapet/last.pt"), "--train", str(data / "train"),
            "--val", str(data / "val"), "--out", str(ft), "--epochs", "2", "--batch-size", "4", "--warmup-epochs",
            "1", "--workers", "0", "--quiet"]  # fmt: skip
    assert mapet_main(argv) == 0
    lines = [json.loads(x) for x in (ft / "metrics.jsonl").read_text().splitlines()]
    out["finetune"] = {
        "losses": [r["loss"] for r in lines],
        "weights": summary(load_checkpoint(ft / "last.pt", kind=FINETUNE_KIND)["model"]),
    }
    return out


def test_the_recorded_runs_are_reproduced(tmp_path, photos, codebook_path):
    got = runs(tmp_path, photos, codebook_path)
    key = rendering()
    record = json.loads(RECORD.read_text())
    if os.environ.get("GOLDEN_WRITE"):
        record[key] = {"pillow": PIL.__version__, **got}
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
    assert key in record, (
        f"no recorded run for this rendering (Pillow {PIL.__version__}, fingerprint {key}): record it with "
        "GOLDEN_WRITE=1 from a commit whose runs match the record"
    )
    want = record[key]
    for name in ("mapet", "beit", "finetune"):
        assert np.allclose(got[name]["losses"], want[name]["losses"], rtol=1e-6, atol=0), name
        assert got[name]["weights"].keys() == want[name]["weights"].keys(), name
        for k, v in want[name]["weights"].items():
            assert got[name]["weights"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, k)
