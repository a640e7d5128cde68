"""--log-to (pretrain/dashboards.py): TensorBoard event files that TensorBoard's own reader reads back as the
records of metrics.jsonl, a W&B run written offline, one W&B run id per run folder."""

import json

import pytest

from cli.mapet import main
from tests.runs import ft_args, separable_folder, training_store

SMALL = ["--model", "mapet_micro", "--image-size", "64", "--patch-size", "16", "--batch-size", "4",
         "--epochs", "1", "--warmup-epochs", "0.5", "--lr", "1e-3", "--workers", "0", "--quiet", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos, codebook_path):
    return training_store(tmp_path_factory.mktemp("dash") / "tokens", photos, codebook_path)


def scalars(folder, tag) -> dict:
    """{step: value} of a tag, as TensorBoard's own reader reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_reads_back_what_metrics_jsonl_holds(store, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert (
        main(["pretrain", "--tokens", str(store), "--out", str(run), *SMALL, "--log-to", "tensorboard"]) == 0
    )
    want = {r["step"]: r["loss"] for r in records(run)}
    assert len(want) == 3 and scalars(run / "tensorboard", "pretrain/loss") == pytest.approx(want, rel=1e-6)
    data = separable_folder(tmp_path / "data", n_per_class=4)
    ft = tmp_path / "ft"
    assert (
        main(ft_args(data, ft, "--epochs", "2", "--workers", "0", "--quiet", "--log-to", "tensorboard")) == 0
    )
    want = {r["epoch"]: r["val_top1"] for r in records(ft)}
    assert scalars(ft / "tensorboard", "finetune/val_top1") == pytest.approx(want, rel=1e-6)
    assert (
        main(["pretrain", "--tokens", str(store), "--out", str(tmp_path / "x"), *SMALL, "--log-to", "mlflow"])
        == 2
    )
    err = capsys.readouterr().err
    assert "--log-to mlflow: not one of tensorboard, wandb" in err and len(err.strip().splitlines()) == 1


def test_wandb_offline_run_keeps_one_id_per_run_folder(store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    argv = ["pretrain", "--tokens", str(store), "--out", str(run), *SMALL, "--log-to", "wandb"]
    assert main([*argv, "--max-steps", "2"]) == 0
    rid = (run / "wandb-id").read_text().strip()
    assert main([*argv, "--resume", "auto"]) == 0  # the same W&B run continues
    assert (run / "wandb-id").read_text().strip() == rid
    offline = sorted((run / "wandb").glob(f"offline-run-*-{rid}"))
    assert offline and all(list(d.glob(f"run-{rid}.wandb")) for d in offline)
