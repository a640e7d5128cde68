"""The benchmark scripts run end to end on tiny settings, so a GPU session never finds one broken.

They print measured ratios (speed goals live there, not in timed tests); these checks assert only what does
not depend on the machine's speed: that each script finishes, and its deterministic figures (FLOP and
saved-memory ratios, the k-means objective). The parity scripts (docs/fidelity.md) run the official MaPeT,
k-CLIP, BEiT and BEiT v2 code beside ours: their tests run when MAPET_OFFICIAL / BEIT_CODE / BEIT2_CODE /
MAPET_OFFICIAL_TIMM name that code (never shipped here) and are skipped otherwise; each script's error for a missing folder is tested
everywhere.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"{script} {' '.join(args)}: exit {r.returncode}\n{r.stderr[-2000:]}"
    return r.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1))


@pytest.mark.parametrize(
    "extra",
    [(), ("--grad-checkpointing",), ("--attn-backend", "sdpa", "--online", "--profile", "1")],
    ids=["eager", "grad-checkpointing", "online-profile"],
)
def test_step_bench_on_the_micro_model(extra):
    out = bench("mapet_step.py", "--sizes", "micro", "--iters", "1", "--warmup", "1", *extra)
    # micro: N 50, c 13, P 37; the FLOP ratio is a property of the two models, not of the machine
    assert "[micro] N=50 c=13 P=37" in out
    assert 1.8 < number(r"MaPeT / BEiT: \S+ \(goal <= 2\.2; FLOPs (\d+\.\d+)", out) < 2.2
    assert number(r"mask built once: (\d+\.\d+) ms", out) > 0
    if "--online" in extra:
        assert number(r"ratio cache / online (\d+\.\d+)x", out) > 0
        assert "MaPeT step profile, 1 steps" in out


def test_gpu_script_parses():
    """bench/gpu_all.sh runs only on a lent GPU: at least its syntax is checked everywhere."""
    assert subprocess.run(["bash", "-n", "bench/gpu_all.sh"], cwd=ROOT).returncode == 0


def test_saved_activations_bench_counts_mapet_above_beit():
    out = bench("saved_activations.py", "--size", "tiny")
    # MaPeT keeps 491 rows per image in 11 blocks (147 in the last), BEiT 197: ~2.3x the saved memory
    assert 2.0 < number(r"MaPeT / BEiT (\d+\.\d+)", out) < 2.6


def test_kmeans_bench_compares_the_backends():
    out = bench("kmeans_backends.py", "--n", "2000", "--dim", "16", "--k", "8", "--niter", "4")
    assert 0.9 < number(r"objective torch / faiss (\d+\.\d+)", out) < 1.1


def test_loader_benches_run_with_and_without_workers():
    for workers in ("0", "1"):
        out = bench(
            "loader_transfer.py", "--workers", workers, "--images", "16", "--batch-size", "8", "--size", "64"
        )
        assert number(r"uint8 per batch (\d+) img/s", out) > 0
    out = bench(
        "train_loader.py", "--images", "8", "--repeats", "1", "--store-rows", "1024", "--batch-size", "8"
    )
    assert number(r"one worker \(sample \+ its tokens\): (\d+) img/s", out) > 0


def test_worker_memory_bench_shows_strarrays_stay_shared():
    """Memory, not time: forked workers reading a listing copy its Python strings, never a StrArray's buffer."""
    out = bench("worker_memory.py", "--images", "200000", "--workers", "2", "--epoch-share", "0.5")
    # a worker's private memory may also shrink a little (-0.1 MiB seen): the figures are signed
    tuples = number(r"tuple of str +private memory gained per worker: +(-?\d+\.\d)", out)
    packed = number(r"StrArray +private memory gained per worker: +(-?\d+\.\d)", out)
    assert tuples > 10 and packed < tuples / 5, out


def test_train_loader_bench_refuses_a_store_smaller_than_a_shard():
    r = subprocess.run(
        [sys.executable, "bench/train_loader.py", "--store-rows", "64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--store-rows 64: must be a positive multiple of 1024" in r.stderr


def test_tokenize_bench_on_the_tiny_tokenizer():
    out = bench(
        "tokenize_throughput.py",
        *("--model", "tokenkit-tiny-vit", "--grid", "4", "--k", "16", "--images", "8", "--batch-size", "4"),
        *("--workers", "0", "--repeats", "1"),
    )
    assert number(r"bare CLIP forward (\d+\.\d+) img/s", out) > 0
    assert "median ratio tokenize / bare forward" in out


OFFICIAL = os.environ.get("MAPET_OFFICIAL", "")  # a checkout of aimagelab/MaPeT (never shipped here)
OFFICIAL_TIMM = os.environ.get("MAPET_OFFICIAL_TIMM", "")  # a folder holding timm 0.6.x, for its models


@pytest.mark.skipif(not OFFICIAL, reason="set MAPET_OFFICIAL (and MAPET_OFFICIAL_TIMM) to the official code")
@pytest.mark.parametrize("drop_path", ["0", "0.5"])
def test_official_parity(drop_path):
    """Same weights, images, orders and targets: the official model and ours agree to float64 rounding in
    logits, loss and every gradient, with and without drop path (the same draws on both sides)."""
    out = bench(
        "official_parity.py", "--official", OFFICIAL, "--official-pythonpath", OFFICIAL_TIMM,
        "--drop-path", drop_path,
    )  # fmt: skip
    assert "targets differing: 0" in out and "  match" in out, out
    assert number(r"logits ([0-9.e+-]+)", out) < 1e-12


@pytest.mark.skipif(not OFFICIAL, reason="set MAPET_OFFICIAL to the official code")
def test_kclip_parity():
    """The official k-CLIP code (its CLIP port's last-stage features, its faiss search) and tokenkit give the
    same features and tokens for the same weights and input; square photos tokenize identically end to end."""
    out = bench("kclip_parity.py", "--official", OFFICIAL)
    assert (
        number(r"same input: .*largest relative difference ([0-9.e+-]+)", out) < 1e-6 and "  match" in out
    ), out
    assert re.search(r"assignment of \d+ features: 0 differ", out), out
    for name in ("astronaut", "coffee", "camera"):
        assert f"tokens of {name}: 100.0% equal" in out, out


BEIT_CODE = os.environ.get("BEIT_CODE", "")  # the beit/ folder of microsoft/unilm (never shipped here)


@pytest.mark.skipif(not BEIT_CODE, reason="set BEIT_CODE (and MAPET_OFFICIAL_TIMM) to BEiT's code")
def test_beit_parity():
    """Same weights, images, masks and targets: BEiT's model and our baseline agree to float64 rounding, and
    our blockwise masks have the distribution of BEiT's MaskingGenerator."""
    out = bench("beit_parity.py", "--beit", BEIT_CODE, "--beit-pythonpath", OFFICIAL_TIMM, "--masks", "5000")
    assert out.count("  match") == 2 and "MISMATCH" not in out, out
    assert number(r"logits ([0-9.e+-]+)", out) < 1e-12


BEIT2_CODE = os.environ.get("BEIT2_CODE", "")  # the beit2/ folder of microsoft/unilm (never shipped here)


@pytest.mark.skipif(not BEIT2_CODE, reason="set BEIT2_CODE to BEiT v2's code")
def test_vqkd_parity():
    """BEiT v2's own VQKD, converted by `tokenkit convert`, gives our tokenizer's codes (float64: the
    projections to rounding)."""
    out = bench("tokenizer_parity.py", "vqkd", "--beit2", BEIT2_CODE, "--size", "tiny", "--dtype", "float64")
    assert "codes equal 100.00%" in out and number(r"projections rel ([0-9.e+-]+)", out) < 1e-12, out


@pytest.mark.skipif(not BEIT_CODE, reason="set BEIT_CODE to BEiT's code")
def test_dalle_parity():
    """The dall_e encoder behind BEiT's two-view crop and our converted DALL-E tokenizer behind a store view:
    the same pixels, logits and codes."""
    out = bench("tokenizer_parity.py", "dalle", "--beit", BEIT_CODE)
    assert "at most 0 grey levels, logits rel 0.00e+00, codes equal 100.00%" in out, out


@pytest.mark.parametrize(
    "script,flag,what",
    [
        ("official_parity.py", "--official", "the official MaPeT code"),
        ("kclip_parity.py", "--official", "the official k-CLIP code"),
        ("beit_parity.py", "--beit", "BEiT's code"),
        ("tokenizer_parity.py vqkd", "--beit2", "BEiT v2's code"),
        ("tokenizer_parity.py dalle", "--beit", "BEiT's transforms.py"),
    ],
)
def test_parity_scripts_name_a_missing_folder(tmp_path, script, flag, what):
    r = subprocess.run(
        [sys.executable, *f"bench/{script}".split(), flag, str(tmp_path / "nowhere")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert f"cannot import {what} from" in r.stderr and "nowhere" in r.stderr, r.stderr
