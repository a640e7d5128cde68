"""Crash safety: SIGKILL at 20 seeded points of each long job, then --resume, gives the uninterrupted result.

Children are forked from a forkserver that has imported the jobs once, so each kill costs a fork, not an
interpreter start. See tests/reliability_jobs.py for the kill points.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenkit.wds
from cli.tokenkit import main as tokenkit_main
from pretrain.checkpoint import load_checkpoint
from tests.reliability_jobs import HOOKS, count_hooks, run_job, run_with_kill
from tests.test_tokenize import tree_bytes
from tokenkit.store import verify

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["tests.reliability_jobs"])
POINTS = 20


def kill_points(job: str, args: dict, seed: int) -> list[tuple[str, int]]:
    with CTX.Pool(1) as pool:
        counts = pool.apply(count_hooks, (job, args))
    points = [(h, i) for h in HOOKS[job] for i in range(1, counts[h] + 1)]
    assert len(points) >= POINTS, counts
    rng = np.random.default_rng(seed)
    return [points[i] for i in sorted(rng.choice(len(points), POINTS, replace=False))]


def killed_then_resumed(job: str, args: dict, hook: str, n: int) -> None:
    p = CTX.Process(target=run_with_kill, args=(job, args, hook, n, False))
    p.start()
    p.join(300)
    assert p.exitcode == -9, f"{job} {hook}#{n}: exit {p.exitcode}, expected SIGKILL"
    run_job(job, args, resume=True)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, photos, codebook_path):
    root = tmp_path_factory.mktemp("refs")
    out = {"features": root / "features", "tokenize": root / "tokens", "pretrain": root / "run"}
    run_job("features", {"images": photos, "out": out["features"]}, resume=False)
    run_job("tokenize", {"images": photos, "codebook": codebook_path, "out": out["tokenize"]}, resume=False)
    run_job("pretrain", {"tokens": out["tokenize"], "out": out["pretrain"]}, resume=False)
    return out


@pytest.mark.parametrize("job", ["features", "tokenize"])
def test_store_jobs_survive_kill_9_at_20_points(job, refs, photos, codebook_path, tmp_path):
    base = {"images": photos, "codebook": codebook_path}
    points = kill_points(job, {**base, "out": tmp_path / "count"}, seed=0 if job == "features" else 1)
    want = tree_bytes(refs[job])
    for hook, n in points:
        out = tmp_path / f"{hook}-{n}"
        killed_then_resumed(job, {**base, "out": out}, hook, n)
        assert tree_bytes(out) == want, f"{job} killed at {hook}#{n} resumed to a different store"
        shutil.rmtree(out)


def metrics(run: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["token_acc"])
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]


def test_pretrain_survives_kill_9_at_20_points(refs, tmp_path):
    args = {"tokens": refs["tokenize"]}
    points = kill_points("pretrain", {**args, "out": tmp_path / "count"}, seed=2)
    want_metrics = metrics(refs["pretrain"])
    want = load_checkpoint(refs["pretrain"] / "last.pt")["model"]
    for hook, n in points:
        out = tmp_path / f"{hook}-{n}"
        killed_then_resumed("pretrain", {**args, "out": out}, hook, n)
        assert metrics(out) == want_metrics, f"pretrain killed at {hook}#{n}: other loss sequence"
        got = load_checkpoint(out / "last.pt")["model"]
        assert all(torch.equal(got[k], want[k]) for k in want), (
            f"pretrain killed at {hook}#{n}: other weights"
        )
        assert not list(out.glob(".*tmp*"))
        shutil.rmtree(out)


def test_disk_full_stops_cleanly_and_resumes(refs, photos, codebook_path, tmp_path, capsys, monkeypatch):
    real = tokenkit.wds.atomic_write_bytes
    calls = [0]

    def full(path, data):
        calls[0] += 1
        if calls[0] == 3:  # the third tar: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(tokenkit.wds, "atomic_write_bytes", full)
    out = tmp_path / "tokens"
    argv = [
        "tokenize",
        str(photos),
        str(codebook_path),
        str(out),
        "--views",
        "2",
        "--view",
        "random",
        "--seed",
        "1",
        "--format",
        "both",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--quiet",
    ]
    assert tokenkit_main(argv) == 1
    err = capsys.readouterr().err
    assert "disk full; free space and re-run with --resume" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    # what a kill during a write leaves: our temporary file, and zarr's (a shard is written on the commit
    # thread while the next shard's batches run, so a kill can land in the middle of zarr's write)
    (out / "wds/.shard-000002.tar.tmp-4242").write_bytes(b"torn")
    (out / "tokens/c/1/0/0/0.3003cc760f9144328ab9f8063d4fb80f.partial").write_bytes(b"")
    monkeypatch.setattr(tokenkit.wds, "atomic_write_bytes", real)
    assert tokenkit_main([*argv, "--resume"]) == 0
    assert tree_bytes(out) == tree_bytes(refs["tokenize"])


class Interrupted(BaseException):
    """An in-process stand-in for a kill: nothing of the job catches it."""


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kills=st.lists(st.integers(min_value=1, max_value=12), min_size=0, max_size=4))
def test_any_sequence_of_kills_and_resumes_ends_in_the_same_store(
    kills, refs, photos, codebook_path, tmp_path
):
    """Property: interrupt the tokenize job at the n-th atomic write, resume, interrupt again, ...: the store
    that finally completes is byte-identical to one uninterrupted run."""
    import tokenkit.journal as journal

    out = tmp_path / f"store-{'-'.join(map(str, kills)) or 'none'}"
    shutil.rmtree(out, ignore_errors=True)
    args = {"images": photos, "codebook": codebook_path, "out": out}
    real = journal.atomic_write_bytes
    for n in kills:
        calls = [0]

        def dying(path, data, n=n, calls=calls):
            calls[0] += 1
            if calls[0] == n:
                raise Interrupted
            real(path, data)

        mods = [journal, tokenkit.wds]
        for m in mods:
            m.atomic_write_bytes = dying
        try:
            run_job("tokenize", args, resume=True)
        except Interrupted:
            pass
        finally:
            for m in mods:
                m.atomic_write_bytes = real
    run_job("tokenize", args, resume=True)
    assert tree_bytes(out) == tree_bytes(refs["tokenize"])
    assert verify(out) == []
