"""features: what changes a byte is the job's identity, what does not may change on resume."""

from cli.tokenkit import main
from tests.preempt import run_preempted
from tests.test_tokenize import tree_bytes


def test_a_resume_may_change_batch_size_and_workers_but_not_the_precision(tmp_path, photos, capsys):
    """A preempted features job resumed with another batch size and worker count writes the uninterrupted
    job's store byte for byte; a resume at another precision (another kind of device would be the same) is
    refused, naming what changed, and leaves the store as it was."""
    enc = ["--model", "hog", "--grid", "4", "--image-size", "64", "--shard-size", "4", "--quiet"]
    ref = tmp_path / "ref"
    assert main(["features", str(photos), str(ref), *enc, "--workers", "0"]) == 0
    out = tmp_path / "feat"
    args = ["features", str(photos), str(out), *enc]
    rc, err = run_preempted(
        "cli.tokenkit",
        "tokenkit.features:_FeatureShard.add",
        2,
        [*args, "--batch-size", "1", "--workers", "1"],
    )
    assert rc == 143 and "resumes with --resume" in err, err[-2000:]
    before = tree_bytes(out)
    assert main([*args, "--resume", "--precision", "bf16", "--workers", "0"]) == 2
    assert 'compute.precision: "fp32" -> "bf16"' in capsys.readouterr().err and tree_bytes(out) == before
    assert main([*args, "--resume", "--batch-size", "3", "--workers", "0"]) == 0
    assert tree_bytes(out) == tree_bytes(ref)
