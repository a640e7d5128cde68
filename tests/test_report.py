"""`mapet report` (pretrain/report.py): any runs on one page, with McNemar verdicts between runs evaluated on
the same images."""

import pytest

from cli.mapet import main
from tests.runs import eval_args, pretrained_run, separable_folder


def test_report_of_any_runs(tmp_path, photos, codebook_path, capsys):
    pytest.importorskip("matplotlib")
    data = separable_folder(tmp_path / "data")
    run = pretrained_run(tmp_path / "a", photos, codebook_path).parent
    assert main(["knn", *eval_args(data, run / "last.pt")]) == 0  # knn-data.json beside the checkpoint
    other = tmp_path / "b" / "run"  # a second run of the same name: named by its parent in the report
    other.mkdir(parents=True)
    assert main(["knn", *eval_args(data), "--result", str(other / "knn-data.json")]) == 0
    assert main(["report", str(run), str(other), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| a/run | 3 |" in md  # pre-training: 12 photos / batch 4 = 3 steps
    assert "| a/run | `knn-data.json` |" in md and "| b/run | `knn-data.json` |" in md
    assert "`knn-data.json`: a/run " in md and "McNemar p = " in md  # the same val images: tested
    assert "over clip tokenkit-tiny-vit" in md  # the store the pre-training read
    for png in ("pretrain_curves.png", "codebook_usage_0.png", "token_maps_0.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep2")]) == 2
    assert "not a run folder" in capsys.readouterr().err
