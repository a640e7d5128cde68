"""The options every training command shares (cli/runtime.py): --config FILE, --version, --blr and the
learning-rate warnings, and --init-from, which extends a finished pre-training with a new schedule."""

import json

import pytest
import torch

from cli.mapet import main as mapet_main
from cli.tokenkit import main as tokenkit_main
from pretrain.checkpoint import load_checkpoint
from tests.runs import training_store

SMALL = ["--model", "mapet_micro", "--image-size", "64", "--patch-size", "16", "--batch-size", "4",
         "--epochs", "1", "--warmup-epochs", "0.5", "--workers", "0", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos, codebook_path):
    return training_store(tmp_path_factory.mktemp("opts") / "tokens", photos, codebook_path)


def pretrain(capsys, *argv):
    rc = mapet_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def config(run):
    return json.loads((run / "config.json").read_text())


def test_version(capsys):
    for main, prog in ((mapet_main, "mapet"), (tokenkit_main, "tokenkit")):
        assert main(["--version"]) == 0
        assert capsys.readouterr().out.startswith(f"{prog} 0.")


def test_a_config_file_sets_options_and_flags_override_it(store, tmp_path, capsys):
    first = tmp_path / "first"
    rc, err = pretrain(
        capsys, "pretrain", "--tokens", store, "--out", first, *SMALL, "--lr", "1e-3", "--max-steps", 1
    )
    assert rc == 0, err
    again = tmp_path / "again"  # a run's own config.json repeats it, in another folder
    rc, err = pretrain(capsys, "pretrain", "--config", first / "config.json", "--out", again)
    assert rc == 0, err
    assert config(again) == {**config(first), "out": str(again)}
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text(f"tokens: {store}\nout: {tmp_path / 'y'}\nmodel: mapet_micro\nimage-size: 64\n"
                         "batch_size: 4\nepochs: 1\nwarmup-epochs: 0.5\nlr: 1.0e-3\nworkers: 0\nmax-steps: 1\n")  # fmt: skip
    rc, err = pretrain(capsys, "pretrain", "--lr", "2e-3", "--config", yaml_file, "--quiet")
    assert rc == 0, err
    got = config(tmp_path / "y")
    assert (got["lr"], got["image_size"], got["batch_size"], got["epochs"]) == (
        2e-3,
        64,
        4,
        1,
    )  # the flag won
    for text, why in (("epochs: 1\nlearning_rate: 3\n", "learning_rate is not an option"), ("[1, 2]\n", "no mapping"),
                      ("epochs: [1\n", "not a readable JSON / YAML file")):  # fmt: skip
        yaml_file.write_text(text)
        rc, err = pretrain(capsys, "pretrain", "--config", yaml_file)
        assert rc == 2 and why in err and len(err.strip().splitlines()) == 1, err


def test_blr_scales_with_the_global_batch_and_the_default_lr_warns(store, tmp_path, capsys):
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", tmp_path / "b", *SMALL, "--blr", "0.01",
                       "--accum-steps", 2, "--max-steps", 1)  # fmt: skip
    assert rc == 0 and "warning" not in err, err
    assert config(tmp_path / "b")["lr"] == pytest.approx(0.01 * 8 / 256)  # 4 x 2 accumulated, one process
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", tmp_path / "c", *SMALL, "--blr", "0.01",
                       "--lr", "1e-3")  # fmt: skip
    assert rc == 2 and "--blr with --lr: pass one of them" in err
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", tmp_path / "d", *SMALL, "--warmup-epochs",
                       "1", "--max-steps", 1)  # fmt: skip
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 2, err
    assert (
        "--lr 0.0015 is tuned for a global batch of 2048, this run's is 4; pass --blr 0.0001875" in lines[0]
    )
    assert "--warmup-epochs 1 is not shorter than --epochs 1" in lines[1]


def test_init_from_extends_a_finished_run_with_a_new_schedule(store, tmp_path, capsys):
    done = tmp_path / "done"
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", done, *SMALL, "--lr", "1e-3")
    assert rc == 0, err
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", done, *SMALL, "--lr", "1e-3", "--epochs", 2,
                       "--resume", "auto")  # fmt: skip
    assert rc == 2 and "epochs" in err  # a longer schedule is another run: resume refuses it
    more = tmp_path / "more"  # starts from the weights; an lr of 1e-12 leaves them where they were
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", more, *SMALL, "--lr", "1e-12", "--min-lr", "0",
                       "--init-from", done / "last.pt", "--max-steps", 1)  # fmt: skip
    assert rc == 0, err
    before, after = load_checkpoint(done / "last.pt"), load_checkpoint(more / "last.pt")
    assert after["step"] == 1 and after["config"]["init_from"] == str(done / "last.pt")
    for k, v in before["model"].items():
        torch.testing.assert_close(after["model"][k], v, rtol=0, atol=1e-6)
    fresh = tmp_path / "fresh"
    rc, err = pretrain(
        capsys,
        "pretrain",
        "--tokens",
        store,
        "--out",
        fresh,
        *SMALL,
        "--lr",
        "1e-12",
        "--min-lr",
        "0",
        "--max-steps",
        1,
    )
    assert rc == 0 and not torch.equal(load_checkpoint(fresh / "last.pt")["model"]["encoder.pos_embed"],
                                       before["model"]["encoder.pos_embed"])  # fmt: skip
    rc, err = pretrain(capsys, "pretrain", "--tokens", store, "--out", tmp_path / "x", *SMALL, "--lr", "1e-3", "--objective", "beit",
                       "--init-from", done / "last.pt")  # fmt: skip
    assert (
        rc == 2 and "--init-from" in err and "same --objective" in err and len(err.strip().splitlines()) == 1
    )


def test_resume_from_an_earlier_checkpoint_goes_back_to_its_step(store, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["pretrain", "--tokens", store, "--out", run, *SMALL, "--lr", "1e-3", "--epochs", 2]
    rc, err = pretrain(capsys, *argv)
    assert rc == 0, err
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == ["ckpt-00000003.pt", "ckpt-00000006.pt"]
    rc, err = pretrain(capsys, *argv, "--resume", run / "ckpt-00000003.pt")
    assert rc == 2 and "holds checkpoints past its step 3 (ckpt-00000006.pt)" in err
    (run / "ckpt-00000006.pt").rename(tmp_path / "first-end.pt")
    rc, err = pretrain(capsys, *argv, "--resume", run / "ckpt-00000003.pt")
    assert rc == 0, err
    again, first = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "first-end.pt")
    assert again["step"] == 6 and [json.loads(x)["step"] for x in config_lines(run)] == [
        1,
        6,
    ]  # cut back, then on
    for k, v in first["model"].items():
        assert torch.equal(again["model"][k], v), k  # keyed draws: the same steps again
    other = tmp_path / "other"  # another run's checkpoint is not resumed into this run's folder
    rc, err = pretrain(
        capsys, "pretrain", "--tokens", store, "--out", other, *SMALL, "--lr", "1e-3", "--max-steps", 1
    )
    rc, err = pretrain(capsys, *argv, "--resume", other / "last.pt")
    assert rc == 2 and "holds another run" in err
    rc, err = pretrain(capsys, *argv, "--resume", tmp_path / "nothing.pt")
    assert rc == 2 and "--resume" in err and "pass auto, no or a checkpoint file" in err


def config_lines(run):
    return (run / "metrics.jsonl").read_text().splitlines()
