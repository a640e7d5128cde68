"""The README's main command, on a tiny slice: the same script, the same CLI chain, a report at the end."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_on_a_tiny_slice(tmp_path):
    run = tmp_path / "qs"
    env = {**os.environ, "LIMIT": "6", "EPOCHS": "1", "BATCH": "8"}
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
    for png in ("pretrain_curves.png", "codebook_usage.png", "token_maps.png"):
        assert (run / png).stat().st_size > 1000
    assert "done in" in out
    # re-running reuses every stage
    r = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(run)], cwd=ROOT, env=env, capture_output=True, timeout=900
    )
    assert r.returncode == 0 and r.stdout.decode().count(": reused") >= 17
    # ... and only with the settings it was built with
    r = subprocess.run(
        ["bash", "scripts/quickstart.sh", str(run)],
        cwd=ROOT,
        env={**env, "EPOCHS": "2"},
        capture_output=True,
        timeout=900,
    )
    assert r.returncode == 2 and "EPOCHS=1" in r.stderr.decode() and "EPOCHS=2" in r.stderr.decode()
