"""One writer per output (tokenkit/lock.py): a second writer of a store, a features store, a codebook or a
run folder exits 2 naming the holder; the lock dies with its process, kill -9 included."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cli.mapet import main as mapet_main
from cli.tokenkit import main as tokenkit_main
from tokenkit.lock import OutputLock, OutputLocked


def held_by_another_process(out):
    """A child process that takes the lock of `out` and sleeps; returns it once it holds the lock."""
    code = f"from pathlib import Path; from tokenkit.lock import OutputLock; import time\nwith OutputLock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_of_each_output_exits_2_naming_the_holder(
    tmp_path, photos, features_store, codebook_path, capsys
):
    outs = {
        "features": (
            tmp_path / "f",
            ["features", str(photos), str(tmp_path / "f"), "--workers", "0", "--quiet"],
        ),
        "tokenize": (
            tmp_path / "t",
            ["tokenize", str(photos), str(codebook_path), str(tmp_path / "t"), "--workers", "0"],
        ),
        "codebook": (
            tmp_path / "cb.safetensors",
            ["codebook", str(features_store), str(tmp_path / "cb.safetensors"), "--k", "4"],
        ),
    }
    for name, (out, argv) in outs.items():
        child = held_by_another_process(out)
        try:
            rc = tokenkit_main(argv)
            err = capsys.readouterr().err
            assert rc == 2 and f"{out}: process {child.pid} is writing it" in err, (name, err)
            assert not out.exists(), name  # nothing half-written
        finally:
            child.kill()
            child.wait()
    run = tmp_path / "run"
    child = held_by_another_process(run)
    try:
        store = tmp_path / "t"
        assert tokenkit_main(outs["tokenize"][1]) == 0  # the lock of t was released with its child
        rc = mapet_main(
            [
                "pretrain",
                "--tokens",
                str(store),
                "--out",
                str(run),
                "--model",
                "mapet_micro",
                "--resume",
                "auto",
            ]
        )
        assert rc == 2 and f"process {child.pid} is writing it" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()


def test_the_lock_dies_with_its_process_even_kill_9(tmp_path):
    out = tmp_path / "store"
    child = held_by_another_process(out)
    with pytest.raises(OutputLocked):
        with OutputLock(out):
            pass
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases a flock when its holder's file descriptors close
        try:
            with OutputLock(out):
                break
        except OutputLocked:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not (tmp_path / ".store.lock").exists()  # released and removed
