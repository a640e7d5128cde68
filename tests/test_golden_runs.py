"""A fixed CPU pre-training run and a fixed fine-tuning run, recorded: their loss sequences and final weights
must not change when the training code is reorganised (tests/golden_runs.json). Regenerate the record, after
a change meant to alter the computation, with GOLDEN_WRITE=1 pytest tests/test_golden_runs.py."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cli.mapet import main as mapet_main
from pretrain.checkpoint import FINETUNE_KIND, load_checkpoint
from pretrain.train import TrainConfig, pretrain
from tests.test_evaluate import separable_folder
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig

RECORD = Path(__file__).with_name("golden_runs.json")


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
    if os.environ.get("GOLDEN_WRITE"):
        RECORD.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(RECORD.read_text())
    for name in ("mapet", "beit", "finetune"):
        assert np.allclose(got[name]["losses"], want[name]["losses"], rtol=1e-6, atol=0), name
        assert got[name]["weights"].keys() == want[name]["weights"].keys(), name
        for k, v in want[name]["weights"].items():
            assert got[name]["weights"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, k)
