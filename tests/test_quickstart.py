"""The README's main command, on a tiny slice: the same script, the same CLI chain, a report at the end."""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tokenkit.store import TokenStore

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_on_a_tiny_slice(tmp_path):
    run = tmp_path / "qs"
    env = {**os.environ, "LIMIT": "6", "EPOCHS": "1", "BATCH": "8", "FT_EPOCHS": "1", "FT_BATCH": "2"}
    r = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(run)], cwd=ROOT, env=env, capture_output=True, timeout=900
    )
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out[-4000:]
    report = (run / "report.md").read_text()
    rows = [
        line for line in report.splitlines() if line.startswith("| cell type") or line.startswith("| defect")
    ]
    assert len(rows) == 6  # 2 tasks x (random, beit, mapet)
    # each pre-trained encoder against random init, per task and evaluation, tested on the same val images
    verdicts = re.findall(r"^- .*McNemar p = .*McNemar p = .*\.$", report, re.M)
    assert len(verdicts) == 4, report
    # fine-tuning: scratch, BEiT and MaPeT with one recipe, each pre-training against scratch, MaPeT against BEiT
    ft_rows = re.findall(
        r"^\| (scratch \(random init\)|BEiT-pretrained|MaPeT-pretrained) \| \d+\.\d% \|$", report, re.M
    )
    assert len(ft_rows) == 3, report
    ft_verdicts = re.findall(
        r"^- (MaPeT|BEiT) (beats|falls below|is level with) (scratch|BEiT) .*McNemar p = [^;]*\)\.$",
        report,
        re.M,
    )
    assert len(ft_verdicts) == 3, report
    assert "tokenizer: k-means (l2) over HOG" in report and "NMI" in report
    # the pre-training table: both objectives, and the baseline of predicting tokens from code frequencies,
    # whose figures are the entropy and the largest share of the store's own code counts
    counts = np.asarray(TokenStore.open(run / "tokens").manifest["code_counts"], dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    m = re.search(r"^\| code frequencies alone \| (\d+\.\d+) \| (\d+\.\d)% \|$", report, re.M)
    assert m, report
    assert float(m.group(1)) == pytest.approx(-(p * np.log(p)).sum(), abs=0.006)
    assert float(m.group(2)) == pytest.approx(100 * p.max(), abs=0.06)
    for obj in ("mapet", "beit"):
        assert re.search(rf"^\| {obj} \| \d+\.\d+ \| \d+\.\d% \|$", report, re.M), report
    for png in ("pretrain_curves.png", "codebook_usage.png", "token_maps.png"):
        assert (run / png).stat().st_size > 1000
    runs_page = (run / "runs" / "report.md").read_text()  # `mapet report` of the same runs
    assert "| pretrain-mapet |" in runs_page and "| finetune-mapet | `result.json` |" in runs_page
    assert "done in" in out
    # re-running reuses every stage
    r = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(run)], cwd=ROOT, env=env, capture_output=True, timeout=900
    )
    assert r.returncode == 0 and r.stdout.decode().count(": reused") >= 21
    # ... and only with the settings it was built with
    r = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(run)],
        cwd=ROOT,
        env={**env, "EPOCHS": "2"},
        capture_output=True,
        timeout=900,
    )
    assert r.returncode == 2 and "EPOCHS=1" in r.stderr.decode() and "EPOCHS=2" in r.stderr.decode()


def test_report_verdicts_test_the_same_val_images():
    """The report's verdict per task and evaluation: McNemar's test on each image's answer, so a difference of
    a few images is "level" while a one-sided split is called; evaluations written before the JSON held the
    answers are reported by top-1 alone."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    labels = [0] * 100
    right = {"random": 50, "mapet": 70, "beit": 52}  # images answered right, the first n of the 100
    results = {
        (task, enc, ev): {"top1": n / 100, "labels": labels, "predictions": [0] * n + [1] * (100 - n)}
        for task in report.TASKS
        for enc, n in right.items()
        for ev in ("knn", "linprobe")
    }
    lines = report.verdicts(results)
    assert len(lines) == 4
    # mapet: 20 images right only for it, none only for random init: p = 2 / 2^20
    assert "mapet beats random init (+20.0 points: 20 images right only for mapet, 0 only" in lines[0]
    assert "McNemar p = 1.9e-06" in lines[0] and "beit is level with random init (+2.0 points" in lines[0]
    del results["defect", "beit", "linprobe"]["predictions"]
    assert lines[:3] == report.verdicts(results)[:3]
    assert (
        "beit +2.0 points against random init (no per-image answers to test)" in report.verdicts(results)[3]
    )
