"""The tokenkit CLI end to end: features -> codebook -> tokenize -> inspect / verify / show, and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from cli.tokenkit import main
from tokenkit.codebook import Codebook


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_chain_end_to_end(tmp_path, photos, capsys):
    feat, cb, tok = tmp_path / "feat", tmp_path / "cb.safetensors", tmp_path / "tok"
    enc = ["--model", "tokenkit-tiny-rn", "--pretrained", "none", "--grid", "3"]
    rc, out, err = run(["features", photos, feat, *enc, "--workers", "0", "--quiet"], capsys)
    assert rc == 0, err
    assert "warning: --model tokenkit-tiny-rn with random weights (--pretrained none)" in err  # one loud line
    rc, out, err = run(
        ["codebook", feat, cb, "--k", "8", "--niter", "5", "--nredo", "2", "--backend", "torch"], capsys
    )
    assert rc == 0 and "K=8 C=256" in out, err
    rc, out, _ = run(["inspect", cb, "--json"], capsys)  # a codebook file: its size, settings and code usage
    st, sizes = json.loads(out), np.asarray(Codebook.load(cb).meta["sizes"], np.float64)
    p = sizes[sizes > 0] / sizes.sum()
    assert rc == 0 and (st["k"], st["dim"], st["grid"], st["n_train"]) == (8, 256, 3, sizes.sum())
    assert st["kmeans"]["nredo"] == 2 and st["backend"] == "torch-cpu"
    assert st["codebook_usage"]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    rc, out, _ = run(["inspect", cb], capsys)
    assert (
        rc == 0 and "K=8 x 256: k-means (l2) over clip tokenkit-tiny-rn (random-init weights, seed 0)" in out
    )
    rc, out, err = run(
        ["tokenize", photos, cb, tok, "--views", "2", "--format", "both", "--workers", "1", "--quiet"], capsys
    )
    assert rc == 0 and "images=12 skipped=0 views=2" in out, err
    rc, out, _ = run(["inspect", tok, "--json"], capsys)
    st = json.loads(out)
    assert rc == 0 and st["k"] == 8 and st["grid"] == 3 and st["labels"] == {"even": 6, "odd": 6}
    assert 1 <= st["codebook_usage"]["used_codes"] <= 8 and st["codebook_usage"]["perplexity"] >= 1
    rc, out, _ = run(["inspect", tok], capsys)
    assert "perplexity" in out and "12 stored, 0 skipped" in out
    assert "random-init weights, seed 0" in out and "random-init weights, seed 0" in st["tokenizer"]
    # --labels: what the codes say about the class folders, from every stored token position
    rc, out, _ = run(["inspect", tok, "--labels", "--json"], capsys)
    q = json.loads(out)["label_quality"]
    assert (
        rc == 0
        and q["positions"] == 12 * 2 * 9
        and 0.5 <= q["purity"] <= 1
        and q["majority_label_share"] == 0.5
    )
    # the store compared with itself: every id agrees, each one's codes give the other's exactly
    rc, out, _ = run(["compare", tok, tok, "--json"], capsys)
    r = json.loads(out)
    assert rc == 0 and r["agreement"] == 1 and r["purity_a_to_b"] == 1 and r["nmi"] == pytest.approx(1)
    assert run(["verify", tok], capsys)[0] == 0
    rc, out, _ = run(["show", tok, "even/astronaut", "--out", tmp_path / "t.png", "--size", "96"], capsys)
    assert rc == 0 and Image.open(tmp_path / "t.png").size == (2 * 96 + 12, 2 * (96 + 6) + 6)
    # encode: one image's tokens without a store, the ones tokenize stores for its central square
    from tokenkit.store import TokenStore

    center = ["--views", "1", "--view", "center", "--format", "zarr", "--workers", "0", "--quiet"]
    assert run(["tokenize", photos, cb, tmp_path / "center", *center], capsys)[0] == 0
    store = TokenStore.open(tmp_path / "center")
    stored = store.read([store.index_of("even/astronaut")])["tokens"][0, 0]  # (G, G)
    photo = photos / "even" / "astronaut.jpg"
    rc, out, err = run(["encode", cb, photo, "--out", tmp_path / "e.png", "--size", "64"], capsys)
    assert rc == 0 and [[int(t) for t in row.split()] for row in out.splitlines()] == stored.tolist(), err
    assert Image.open(tmp_path / "e.png").size == (2 * 64 + 12, 64 + 12)
    rc, out, _ = run(["encode", cb, photo, "--json"], capsys)
    assert json.loads(out) == {"image": str(photo), "grid": 3, "tokens": stored.tolist()}
    rc, _, err = run(["encode", cb, tmp_path / "t.png.missing"], capsys)
    assert rc == 2 and "does not exist" in err
    (tok / "tokens/c/0/0/0/0").write_bytes(b"junk")
    rc, _, err = run(["verify", tok], capsys)
    assert rc == 1 and "shard 0" in err and err.count("\n") >= 1


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["codebook", "{feat}", "{tmp}/cb", "--k", "1"], "--k 1: must be in [2"),
        (["codebook", "{feat}", "{tmp}/cb", "--k", str(2**31)], "--k 2147483648"),
        (["codebook", "{feat}", "{tmp}/cb", "--k", "many"], "'many' is not a valid integer"),
        (["codebook", "{tmp}/nope", "{tmp}/cb"], "does not exist"),
        (
            [
                "features",
                "{photos}",
                "{tmp}/f",
                "--model",
                "tokenkit-tiny-vit",
                "--grid",
                "4",
                "--image-size",
                "70",
            ],
            "--image-size 70 with --grid 4",
        ),
        (["tokenize", "{photos}", "{cb}", "{tmp}/t", "--views", "0"], "--views 0: must be in [1, 1024]"),
        (
            ["tokenize", "{photos}", "{cb}", "{tmp}/t", "--views", "2", "--view", "center"],
            "--views 2 with --view center: every view would be the same",
        ),
        (
            ["tokenize", "{photos}", "{cb}", "{tmp}/t", "--workers", "-1"],
            "--workers -1: must be in [0, 1024]",
        ),
        (["encode", "{cb}", "{photos}/even/astronaut.jpg", "--size", "0"], "--size 0: must be in [1, 4096]"),
        (["features", "{photos}", "{tmp}/f", "--shard-size", "0"], "--shard-size 0: must be in [1, 2^20]"),
        (["features", "{photos}", "{tmp}/f", "--image-size", "0"], "--image-size 0: must be in [1, 8192]"),
        (["tokenize", "{tmp}/empty", "{cb}", "{tmp}/t"], "no images"),
        (["tokenize", "{photos}", "{cb}", "{tmp}/t", "--device", "bogus"], "--device bogus: not a device"),
        (
            ["tokenize", "{photos}", "{cb}", "{tmp}/t", "--device", "cuda:99"],
            "--device cuda:99: this machine has",
        ),
        (["inspect", "{tmp}"], "no manifest.json"),
        (["inspect", "{feat}/features"], "features/features: a folder inside the store "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, photos, features_store, codebook_path, capsys, argv, msg):
    (tmp_path / "empty").mkdir()
    fmt = {"feat": features_store, "tmp": tmp_path, "photos": photos, "cb": codebook_path}
    rc, out, err = run([a.format(**fmt) for a in argv], capsys)
    assert rc == 2
    assert msg in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1


def test_store_of_a_newer_format_is_refused_by_every_command(tmp_path, photos, codebook_path, capsys):
    from tokenkit.tokenize_job import TokenizeConfig, tokenize

    out = tokenize(
        photos, codebook_path, tmp_path / "tok", TokenizeConfig(shard_size=6, workers=0), progress=False
    )
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 7
    (out / "manifest.json").write_text(json.dumps(m))
    for argv in (["inspect", out], ["show", out, "even/astronaut"]):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "format_version 7 is newer than this version reads" in err
    rc, _, err = run(["verify", out], capsys)
    assert rc == 1 and "format_version 7" in err


def test_on_error_raise_names_the_file_and_wds_only_stores_still_show(
    tmp_path, photos, codebook_path, capsys, monkeypatch
):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(photos, src)
    (src / "odd" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rc, _, err = run(
        ["tokenize", src, codebook_path, tmp_path / "t", "--on-error", "raise", "--workers", "0", "--quiet"],
        capsys,
    )
    assert rc == 2 and "odd/broken.jpg" in err and "--on-error skip" in err and "Traceback" not in err
    (src / "odd" / "broken.jpg").unlink()
    rc, _, err = run(
        [
            "tokenize",
            src,
            codebook_path,
            tmp_path / "w",
            "--format",
            "wds",
            "--views",
            "2",
            "--workers",
            "0",
            "--quiet",
        ],
        capsys,
    )
    assert rc == 0, err
    import tokenkit.render as render

    reads = []
    real = render.read_sample
    monkeypatch.setattr(render, "read_sample", lambda *a: reads.append(a[2].key) or real(*a))
    rc, _, _ = run(
        ["show", tmp_path / "w", "odd/chelsea", "--out", tmp_path / "w.png", "--size", "64"], capsys
    )
    assert rc == 0 and Image.open(tmp_path / "w.png").size == (2 * 64 + 12, 2 * (64 + 6) + 6)
    assert reads == ["odd/chelsea"]  # found in the shards' indexes: one sample read, not every shard
    assert run(["show", tmp_path / "w", "nope", "--out", tmp_path / "x.png"], capsys)[0] == 2


def test_the_paper_preset_fills_what_the_command_line_leaves_out(tmp_path, photos, features_store, capsys):
    """--preset mapet-kclip gives the paper's value of every option the command line leaves out and an
    explicit flag wins; the input size follows the grid, so --grid 7 with the preset's RN50x64 is 224 px
    (not a clash with the paper's 448)."""

    cb = tmp_path / "cb.safetensors"
    argv = ["codebook", features_store, cb, "--preset", "mapet-kclip", "--k", "8", "--niter", "3"]
    rc, _, err = run([*argv, "--backend", "torch"], capsys)
    assert rc == 0, err
    got = Codebook.load(cb).meta["kmeans"]
    assert (got["k"], got["niter"], got["nredo"], got["metric"], got["max_points_per_centroid"]) == (
        8, 3, 5, "l2", 512,
    )  # fmt: skip
    missing = tmp_path / "no-such-weights.pt"  # stops the job before any weights load
    features = ["features", photos, tmp_path / "f", "--preset", "mapet-kclip", "--pretrained", missing]
    rc, _, err = run([*features, "--grid", "7"], capsys)
    assert rc == 2 and "no-such-weights.pt: checkpoint not found" in err, err
    rc, _, err = run([*features, "--image-size", "224"], capsys)
    assert rc == 2 and "RN50x64 has stride 32, so the grid needs --image-size 448" in err, err


def test_a_preempted_codebook_fit_resumes_to_the_uninterrupted_codebook(tmp_path, features_store, capsys):
    """SIGTERM during restart 1's third iteration: `tokenkit codebook` finishes that iteration, keeps its
    progress in OUT.progress and exits 143 naming it; re-run without --resume it refuses to start over, with
    --resume it ends with the uninterrupted run's codebook (same sha256) and removes the progress file; re-run
    again with --resume it finds the codebook done."""
    from tests.preempt import run_preempted

    opts = ["--k", "8", "--niter", "5", "--nredo", "2", "--backend", "torch", "--quiet"]
    ref, cb = tmp_path / "ref.safetensors", tmp_path / "cb.safetensors"
    assert run(["codebook", features_store, ref, *opts], capsys)[0] == 0
    argv = ["codebook", str(features_store), str(cb), *opts]
    rc, err = run_preempted("cli.tokenkit", "tokenkit.kmeans:_split_empty", 3, argv)
    progress = tmp_path / "cb.safetensors.progress"
    assert rc == 143 and err.strip().splitlines()[-1] == (
        f"tokenkit: stopped by SIGTERM in k-means restart 1 of 2 after iteration 3: {progress} holds it; "
        "run again with --resume"
    ), err[-2000:]
    assert progress.exists() and not cb.exists()
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "an unfinished k-means for" in err and "pass --resume to continue it" in err, err
    rc, out, err = run([*argv, "--resume"], capsys)
    assert rc == 0 and not progress.exists(), err
    assert Codebook.load(cb).sha256 == Codebook.load(ref).sha256
    before = cb.stat().st_mtime_ns
    assert run([*argv, "--resume"], capsys)[0] == 0 and cb.stat().st_mtime_ns == before


def test_a_codebook_fit_preempted_on_one_process_resumes_on_two_ranks(tmp_path, features_store, capsys):
    """The progress of a fit is the same on every rank (centroids, draws), so a fit preempted as one process
    goes on under torchrun (2 ranks, gloo, each holding half the sample): rank 0 writes the codebook of the
    uninterrupted one-process fit (centroids up to the order of float sums, the same cluster sizes)."""
    import os
    import subprocess
    import sys

    from tests.preempt import ROOT, run_preempted

    opts = ["--k", "8", "--niter", "5", "--nredo", "2", "--backend", "torch", "--quiet"]
    ref, cb = tmp_path / "ref.safetensors", tmp_path / "cb.safetensors"
    assert run(["codebook", features_store, ref, *opts], capsys)[0] == 0
    argv = ["codebook", str(features_store), str(cb), *opts]
    rc, err = run_preempted("cli.tokenkit", "tokenkit.kmeans:_split_empty", 3, argv)
    assert rc == 143, err[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29553",
           "-m", "cli.tokenkit", *argv, "--resume"]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    got, want = Codebook.load(cb), Codebook.load(ref)
    np.testing.assert_allclose(got.centroids, want.centroids, rtol=1e-4, atol=1e-5)
    assert got.meta["sizes"] == want.meta["sizes"] and got.meta["backend"] == "torch-cpu:2"
    assert got.meta["n_train"] == want.meta["n_train"] and not (tmp_path / "cb.safetensors.progress").exists()
