"""A run's lifecycle (pretrain/run.py), through pre-training: resuming a killed run exactly, stopping on SIGTERM on every rank at one step, a full disk at a checkpoint, the settings a resume may and may not change, DDP."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.mapet import main
from pretrain.checkpoint import load_checkpoint
from pretrain.train import pretrain
from tests.preempt import preempt_script, run_preempted
from tests.runs import metrics, tiny, training_store
from tokenkit.errors import ConfigError, StoreError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos, codebook_path):
    return training_store(tmp_path_factory.mktemp("train") / "tokens", photos, codebook_path)


KILLER = """
import os, signal, sys
import pretrain.run as r
import pretrain.train as t
from pretrain.train import TrainConfig
real = r.save_checkpoint
n = [0]
def dying(*a, **k):
    path = real(*a, **k)
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
r.save_checkpoint = dying
cfg = TrainConfig(tokens=sys.argv[1], out=sys.argv[2], model="mapet_micro", image_size=64, patch_size=16,
                  batch_size=4, epochs=4, warmup_epochs=1, lr=1e-3, workers=0, log_every=1, seed=0,
                  ckpt_every=2, objective=sys.argv[3])
t.pretrain(cfg, progress=False)
"""


@pytest.mark.parametrize("objective", ["mapet", "beit"])
def test_killed_run_resumes_with_the_same_loss_sequence(store, tmp_path, objective):
    ref = tmp_path / "ref"
    pretrain(tiny(store, ref, objective=objective, ckpt_every=2), progress=False)
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-c", KILLER, str(store), str(run), objective], cwd=ROOT, capture_output=True
    )
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert load_checkpoint(run / "last.pt")["step"] == 3  # 2nd checkpoint: end of epoch 0 was step 3
    pretrain(tiny(store, run, objective=objective, ckpt_every=2, workers=1), resume=True, progress=False)
    assert [(m["step"], m["loss"], m["token_acc"]) for m in metrics(run)] == [
        (m["step"], m["loss"], m["token_acc"]) for m in metrics(ref)
    ]
    a, b = load_checkpoint(run / "last.pt")["model"], load_checkpoint(ref / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_at_the_next_logged_step_and_resumes_exactly(store, tmp_path):
    """A preempted run (SIGTERM during step 2) trains on to its next logged step (4, mid-epoch: epochs end at
    6 and 12), its loader worker signalled too but still serving steps 3 and 4; checkpoints there, exits 143
    naming the checkpoint; `--resume auto` continues to the uninterrupted run's losses."""
    ref = tmp_path / "ref"
    pretrain(tiny(store, ref, log_every=4, batch_size=2, epochs=2), progress=False)
    run = tmp_path / "run"
    args = ["pretrain", "--tokens", str(store), "--out", str(run), "--model", "mapet_micro", "--image-size", "64",
            "--patch-size", "16", "--batch-size", "2", "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3",
            "--log-every", "4", "--seed", "0", "--quiet"]  # fmt: skip
    # SIGTERM to the job and its loader worker during step 2 (the objective's second call)
    rc, err = run_preempted("cli.mapet", "pretrain.train:Objective.forward", 2, [*args, "--workers", "1"])
    assert rc == 143, err[-2000:]
    assert f"stopped by SIGTERM at step 4: {run / 'last.pt'} holds it" in err and "Traceback" not in err
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert main([*args, "--workers", "0", "--resume", "auto"]) == 0
    assert [(m["step"], m["loss"], m["token_acc"]) for m in metrics(run)] == [
        (m["step"], m["loss"], m["token_acc"]) for m in metrics(ref)
    ]


def test_a_sigterm_on_one_rank_stops_every_rank_at_the_same_step(store, tmp_path):
    """Under torchrun the ranks agree on the stop at the next logged step: only rank 1 is signalled (during
    step 2), both train to step 4, rank 0 checkpoints it, both exit 143."""
    script = tmp_path / "job.py"
    script.write_text(
        preempt_script("cli.mapet", "pretrain.train:Objective.forward", 2, ranks=("1",), whole_group=False)
    )
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(script), "pretrain", "--tokens", str(store), "--out", str(run), "--model", "mapet_micro",
           "--image-size", "64", "--batch-size", "1", "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-3",
           "--workers", "0", "--log-every", "4", "--quiet"]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300
    )
    err = r.stderr.decode()
    assert r.returncode != 0 and "stopped by SIGTERM at step 4" in err, err[-3000:]
    assert "exitcode  : 143" in err and "Traceback" not in err.split("exitcode")[0]
    assert load_checkpoint(run / "last.pt")["step"] == 4


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_the_run_resumes(
    store, tmp_path, monkeypatch, capsys
):
    """ENOSPC while writing the second checkpoint: `mapet pretrain` prints one line naming the file and the
    flag that continues (exit 1); last.pt still holds the first checkpoint, and the resumed run logs the
    uninterrupted run's losses."""
    import errno

    from pretrain import checkpoint

    ref, run = tmp_path / "ref", tmp_path / "run"
    pretrain(tiny(store, ref, epochs=2, ckpt_every=2), progress=False)
    args = ["pretrain", "--tokens", str(store), "--out", str(run), "--model", "mapet_micro", "--image-size", "64",
            "--patch-size", "16", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3",
            "--log-every", "1", "--ckpt-every", "2", "--workers", "0", "--seed", "0", "--quiet"]  # fmt: skip
    real, calls = checkpoint.atomic_write_bytes, []

    def full(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"mapet: error: {calls[1]}: disk full; free space and re-run with --resume auto", (
        err
    )
    assert load_checkpoint(run / "last.pt")["step"] == 2
    monkeypatch.undo()
    assert main([*args, "--resume", "auto"]) == 0
    assert [(m["step"], m["loss"]) for m in metrics(run)] == [(m["step"], m["loss"]) for m in metrics(ref)]


def test_resume_refuses_other_settings_and_other_codebooks(store, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny(store, run, max_steps=2), progress=False)
    with pytest.raises(ConfigError, match="lr 0.001 -> 0.002"):
        pretrain(tiny(store, run, lr=2e-3), resume=True, progress=False)
    with pytest.raises(StoreError, match="store grid 4 != model grid 7"):
        pretrain(tiny(store, tmp_path / "x", image_size=112), progress=False)


@pytest.mark.parametrize("data", ["zarr", "wds"])
def test_a_resume_may_split_the_global_batch_another_way_but_not_change_it(store, tmp_path, data):
    """A batch-4 run resumed at --batch-size 2 --accum-steps 2 (as on half the GPUs) goes on as it would have:
    the uninterrupted run's steps, epochs, learning rates and losses (every draw is keyed by the sample), from
    a zarr store or streamed shards; a resume that changes the global batch is refused, naming both splits and
    the fix."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    pretrain(tiny(store, ref, epochs=2, data=data), progress=False)
    pretrain(tiny(store, run, epochs=2, max_steps=2, data=data), progress=False)
    with pytest.raises(ConfigError) as e:
        pretrain(tiny(store, run, epochs=2, batch_size=2, data=data), resume=True, progress=False)
    assert str(e.value) == (
        f"{run}/last.pt: the run's global batch is 4 (--batch-size 4 x --accum-steps 1 x 1 ranks), this "
        "launch's 2 (2 x 1 x 1); keep it: --accum-steps 2"
    )
    pretrain(tiny(store, run, epochs=2, batch_size=2, accum_steps=2, data=data), resume=True, progress=False)
    got, want = metrics(run), metrics(ref)
    assert [(m["step"], m["epoch"], m["lr"]) for m in got] == [(m["step"], m["epoch"], m["lr"]) for m in want]
    assert [m["loss"] for m in got[:2]] == [m["loss"] for m in want[:2]]  # before the resume: the same run
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=1e-5)  # and after it
    assert all(math.isfinite(m["loss"]) for m in got) and load_checkpoint(run / "last.pt")["world"] == 1


def test_two_rank_gloo_ddp_trains_as_one_process_on_the_global_batch(store, tmp_path):
    """2 ranks x batch 3 under torchrun (gloo) give one process's batch-6 run: the same weights after two AdamW
    steps with drop path and jitter on (every draw is keyed by the sample, not the rank), and the logged loss
    is the mean over the ranks, not rank 0's."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "cli.mapet",
        "pretrain",
        "--tokens",
        str(store),
        "--out",
        str(run),
        "--model",
        "mapet_micro",
        "--image-size",
        "64",
        "--batch-size",
        "3",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--lr",
        "1e-3",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--quiet",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    one = tmp_path / "one"
    pretrain(tiny(store, one, batch_size=6, epochs=1, warmup_epochs=0), progress=False)
    got, want = load_checkpoint(run / "last.pt"), load_checkpoint(one / "last.pt")
    assert got["step"] == want["step"] == 2 and got["world"] == 2
    for k in want["model"]:  # atol: 1% of one step's lr (Adam's update of a near-zero gradient is sign-like)
        torch.testing.assert_close(got["model"][k], want["model"][k], rtol=1e-5, atol=1e-5)
    for a, b in zip(metrics(run), metrics(one), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["step"] == b["step"]
