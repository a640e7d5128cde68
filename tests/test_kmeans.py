from dataclasses import replace

import numpy as np
import pytest

from tokenkit.errors import ConfigError
from tokenkit.kmeans import KMeansConfig, assign, fit


def blobs(n=4000, d=16, centers=24, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 4
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def brute_objective(x, c):
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    return d2.min(1).mean(), d2.argmin(1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_objective_matches_brute_force(backend):
    x = blobs()
    r = fit(x, KMeansConfig(k=24, niter=15, nredo=2, seed=0, backend=backend))
    obj, labels = brute_objective(x, r.centroids)
    assert r.objective == pytest.approx(obj, rel=1e-4)
    assert np.array_equal(r.sizes, np.bincount(labels, minlength=24))
    assert r.sizes.sum() == len(x)
    # far below the spread of the data around its mean (a single centroid)
    assert obj < 0.25 * ((x - x.mean(0)) ** 2).sum(1).mean()


def test_torch_backend_within_one_percent_of_faiss():
    # anisotropic Gaussian, like whitened-free CLIP features: no planted clusters whose recovery hinges on
    # the (backend-specific) random init, so the two Lloyd implementations must reach the same objective
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(20000, 16)) * np.linspace(0.5, 2, 16)).astype(np.float32)
    cfg = dict(k=64, niter=20, nredo=2, seed=0)
    f = fit(x, KMeansConfig(backend="faiss", **cfg)).objective
    t = fit(x, KMeansConfig(backend="torch", **cfg)).objective
    assert abs(t - f) / f < 0.01


def test_spherical_normalises_inputs_itself():
    x = blobs(seed=2) * 7.0  # not unit norm
    r = fit(x, KMeansConfig(k=8, niter=10, nredo=1, metric="cosine", backend="torch"))
    assert np.allclose(np.linalg.norm(r.centroids, axis=1), 1, atol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.array_equal(assign(x, r.centroids, "cosine"), np.argmax(xn @ r.centroids.T, axis=1))


def test_assign_equals_brute_force_in_blocks():
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(1000, 20)).astype(np.float32), rng.normal(size=(37, 20)).astype(np.float32)
    _, want = brute_objective(x, c)
    assert np.array_equal(assign(x, c, block=128), want)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_float16_input_fits_as_its_float32_values(backend, metric):
    """Features are stored as float16 and the torch backend keeps them so (half the memory of the paper's
    4.2M x 4096 sample): it must fit exactly what the same values in float32 give."""
    x16 = blobs(n=3000, d=12, centers=10, seed=4).astype(np.float16)
    cfg = KMeansConfig(k=10, niter=8, nredo=2, seed=0, metric=metric, backend=backend)
    a, b = fit(x16, cfg), fit(x16.astype(np.float32), cfg)
    assert np.array_equal(a.centroids, b.centroids)
    assert a.objective == b.objective and np.array_equal(a.sizes, b.sizes)
    assert np.array_equal(
        assign(x16, a.centroids, metric), assign(x16.astype(np.float32), a.centroids, metric)
    )


def test_lloyd_sums_accumulate_over_blocks():
    """The torch backend's update sums each cluster's rows block by block (float16 rows converted per
    block): equal to the sums over all rows at once."""
    import torch

    from tokenkit.kmeans import _nearest

    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 8)).astype(np.float16)
    c = torch.from_numpy(rng.normal(size=(13, 8)).astype(np.float32))
    sums = torch.zeros(13, 8)
    idx, _ = _nearest(torch.from_numpy(x), c, block=96, sums=sums)
    want = np.zeros((13, 8))
    np.add.at(want, idx.numpy(), x.astype(np.float64))
    assert np.allclose(sums.numpy(), want, atol=1e-4)
    assert np.array_equal(idx.numpy(), brute_objective(x.astype(np.float32), c.numpy())[1])


def test_bad_configs():
    for k in (1, 0, 2**31):
        with pytest.raises(ConfigError, match="--k"):
            KMeansConfig(k=k).validate()
    for bad, msg in (
        (dict(niter=0), r"--niter 0: must be in \[1, 10\^5\]"),
        (dict(seed=-1), r"--seed -1: must be in \[0, 2\^31 - 1\]"),
    ):
        with pytest.raises(ConfigError, match=msg):
            KMeansConfig(**bad).validate()
    with pytest.raises(ConfigError, match="only 10 feature vectors"):
        fit(np.zeros((10, 4), np.float32), KMeansConfig(k=16))


def test_missing_faiss_names_both_extras(monkeypatch):
    import builtins

    from tokenkit.errors import MissingDependencyError
    from tokenkit.kmeans import _faiss

    real = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(MissingDependencyError, match=r"faiss-cpu.*faiss-gpu.*--backend torch"):
        _faiss()
    # auto falls back to the torch backend
    x = blobs(n=500, d=4, centers=4)
    assert fit(x, KMeansConfig(k=4, niter=5, nredo=1)).backend == "torch-cpu"


@pytest.mark.parametrize("gpus", [0, 2])
def test_faiss_gets_its_gpus_only_when_it_has_some(monkeypatch, gpus):
    """faiss.Kmeans(gpu=True) silently runs on CPU without GPUs: the backend asks faiss.get_num_gpus() and
    records what ran. faiss itself runs (the real CPU library); only the GPU count it reports is set."""
    import faiss

    import tokenkit.kmeans as km

    seen = {}
    real = faiss.Kmeans

    def kmeans(d, k, **kw):
        seen["gpu"] = kw["gpu"]
        return real(d, k, **{**kw, "gpu": False})  # this machine has no GPU for faiss to use

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus)
    monkeypatch.setattr(faiss, "Kmeans", kmeans)
    r = km.fit(blobs(n=500), KMeansConfig(k=8, niter=3, nredo=1, backend="faiss"))
    assert seen["gpu"] == (gpus if gpus else False)
    assert r.backend == ("faiss-gpu:2" if gpus else "faiss-cpu")


def test_faiss_restarts_run_one_per_call_as_faiss_runs_them():
    """The faiss backend runs each restart as its own faiss call (so a journal can keep the best so far):
    the centroids faiss's own nredo keeps, bit for bit."""
    import faiss

    x = blobs(n=3000, d=16, centers=40, seed=6)
    r = fit(x, KMeansConfig(k=32, niter=6, nredo=4, seed=7, backend="faiss"))
    km = faiss.Kmeans(16, 32, niter=6, nredo=4, seed=7, max_points_per_centroid=512)
    km.train(x)
    assert np.array_equal(r.centroids, km.centroids)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_a_killed_fit_resumes_from_its_journal_to_the_uninterrupted_centroids(tmp_path, monkeypatch, backend):
    """Killed in its second restart (torch: in an iteration, its state saved after each one; faiss: saved
    after each restart), a journaled fit resumes to the uninterrupted fit's centroids; the journal of
    another fit is refused, naming what differs."""
    import faiss

    import tokenkit.kmeans as km

    x = blobs(n=3000, d=8, centers=12, seed=8)
    cfg = KMeansConfig(k=12, niter=5, nredo=3, seed=1, backend=backend)
    want = fit(x, cfg)
    journal = lambda c: km.FitJournal(tmp_path / "cb.progress", {"k": c.k, "seed": c.seed}, every=0)  # noqa: E731
    calls = []

    def dies(real):
        def call(*a, **k):
            calls.append(1)
            if len(calls) == (
                2 if backend == "faiss" else 8
            ):  # faiss: restart 2; torch: restart 2, iteration 3
                raise KeyboardInterrupt
            return real(*a, **k)

        return call

    if backend == "faiss":
        monkeypatch.setattr(faiss.Kmeans, "train", dies(faiss.Kmeans.train))
    else:
        monkeypatch.setattr(km, "_split_empty", dies(km._split_empty))
    with pytest.raises(KeyboardInterrupt):
        fit(x, cfg, journal=journal(cfg))
    monkeypatch.undo()
    saved = journal(cfg).load()
    assert (saved["redo"], saved.get("iter", 0)) == ((1, 0) if backend == "faiss" else (1, 2))
    got = fit(x, cfg, journal=journal(cfg))
    assert np.array_equal(got.centroids, want.centroids) and got.objective == want.objective
    with pytest.raises(ConfigError, match=r"cb.progress: the progress of another k-means \(k 12 -> 10\)"):
        fit(
            x,
            KMeansConfig(k=10, niter=5, nredo=3, seed=1, backend=backend),
            journal=journal(replace(cfg, k=10)),
        )


TWO_RANK_FIT = """
import sys
import numpy as np
import torch.distributed as dist
from tests.test_kmeans import blobs
from tokenkit.kmeans import KMeansConfig, fit

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = blobs(n=3001, d=8, centers=12, seed=9)  # an odd count: the ranks hold 1501 and 1500 rows
r = fit(x[rank::world], KMeansConfig(k=12, niter=6, nredo=2, seed=3, backend="torch"), "cpu", rank=rank, world=world)
np.savez(sys.argv[1] + f"-{rank}.npz", centroids=r.centroids, sizes=r.sizes, objective=r.objective)
dist.destroy_process_group()
"""


def test_a_two_rank_torch_fit_equals_the_one_process_fit(tmp_path):
    """torchrun, gloo: each rank holds every other row of the sample; the centroids (up to the order of float
    sums), cluster sizes and objective are the one-process fit's, on both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "fit.py"
    script.write_text(TWO_RANK_FIT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
           str(script), str(tmp_path / "r")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    want = fit(
        blobs(n=3001, d=8, centers=12, seed=9), KMeansConfig(k=12, niter=6, nredo=2, seed=3, backend="torch")
    )
    for rank in (0, 1):
        got = np.load(tmp_path / f"r-{rank}.npz")
        np.testing.assert_allclose(got["centroids"], want.centroids, rtol=1e-5, atol=1e-5)
        assert np.array_equal(got["sizes"], want.sizes) and got["sizes"].sum() == 3001
        assert float(got["objective"]) == pytest.approx(want.objective, rel=1e-6)


def test_a_damaged_progress_file_is_refused_in_one_line(tmp_path):
    """A progress file cut short (or not one of ours) is named with the fix, never half-read."""
    from tokenkit.errors import CodebookError
    from tokenkit.kmeans import FitJournal

    x = blobs(n=500, d=4, centers=4)
    cfg = KMeansConfig(k=4, niter=3, nredo=2, backend="torch")
    path = tmp_path / "cb.progress"
    fit(x, cfg, journal=FitJournal(path, {"k": 4}, every=0))  # leaves its state after restart 1 behind
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        CodebookError, match=r"cb.progress: unreadable k-means progress .*; delete it to start over"
    ):
        fit(x, cfg, journal=FitJournal(path, {"k": 4}))
