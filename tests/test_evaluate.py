"""Evaluation and export: k-NN / linear probe beat chance on separable data, timm loads the export,
fine-tuning learns, and checkpoints never unpickle code."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cli.mapet import main
from pretrain.checkpoint import load_checkpoint
from pretrain.evaluate import ProbeConfig, knn_classify, linear_probe, load_vit, mcnemar
from pretrain.export import export
from pretrain.train import TrainConfig, pretrain
from tests.preempt import ROOT, preempt_script, run_preempted
from tests.tars import make_tar
from tokenkit.errors import ConfigError, StoreError
from tokenkit.tokenize_job import TokenizeConfig, tokenize


def separable_folder(root, n_per_class=12, seed=0):
    """Two classes that differ in colour and texture: warm horizontal stripes vs cool vertical stripes."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls, (base, axis) in {"warm": ((200, 80, 40), 0), "cool": ((40, 90, 200), 1)}.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                a = np.zeros((72, 80, 3), np.float64) + base
                stripes = (np.arange(72 if axis == 0 else 80) // 6 % 2) * 50.0
                a += stripes[:, None, None] if axis == 0 else stripes[None, :, None]
                a += rng.normal(0, 25, a.shape)
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{cls}_{i}.png")
    return root


def _eval_args(data, checkpoint="random"):
    """k-NN / linear-probe flags for a separable_folder: a random-init micro ViT at 64 px unless a checkpoint."""
    model = ["--model", "mapet_micro", "--image-size", "64"] if checkpoint == "random" else []
    return ["--checkpoint", str(checkpoint), *model, "--train", str(data / "train"), "--val", str(data / "val"),
            "--workers", "0", "--quiet"]  # fmt: skip


def test_knn_classify_matches_a_hand_computed_vote():
    train = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.5]])
    pred = knn_classify(train, y, val, k=3, temperature=0.07)
    assert pred.tolist() == [0, 1, 0]


def test_mcnemar_matches_the_exact_binomial_tail():
    # 10 images right only for a, 2 only for b, 5 right for both, 3 wrong for both:
    # p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    a = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3
    b = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3
    assert mcnemar(a, b) == (10, 2, pytest.approx(2 * 79 / 4096, rel=1e-12))
    assert mcnemar(b, a)[2] == pytest.approx(2 * 79 / 4096, rel=1e-12)  # two-sided
    assert mcnemar(a, a) == (0, 0, 1.0)  # no discordant image: no evidence either way
    assert mcnemar([1, 0], [0, 1])[2] == 1.0  # capped: an even split
    # ImageNet-sized val sets: 2^-n underflows a float, the log-space sum does not
    big = np.arange(50_000) < 25_400  # 25,400 vs 24,600 discordant: z = 3.58, p ~ 3.5e-4
    assert 2e-4 < mcnemar(big, ~big)[2] < 5e-4


def test_knn_and_linprobe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    y = torch.arange(500) % 5
    x = centers[y] + torch.randn(500, 32, generator=g)
    pred = knn_classify(x[:400], y[:400], x[400:])
    assert (pred == y[400:]).float().mean() > 0.9  # chance is 0.2
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], ProbeConfig())
    assert res["top1"] > 0.9


def test_cli_knn_linprobe_finetune_on_separable_images(tmp_path, capsys):
    data = separable_folder(tmp_path / "data")
    common = _eval_args(data)
    assert main(["knn", *common, "--out", str(tmp_path / "knn.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["top1"] > 0.9 and knn["n_val"] == 24 and knn["majority_baseline"] == 0.5
    assert knn["k"] == 20 and knn["image_size"] == 64
    # each val image's label and answer, in val order: the top-1 is theirs
    assert len(knn["predictions"]) == len(knn["labels"]) == 24
    assert np.mean(np.equal(knn["predictions"], knn["labels"])) == pytest.approx(knn["top1"])
    assert main(["knn", *common, "--k", "100", "--out", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["k"] == 24  # the k used: every training image
    for bad, msg in (
        (["knn", "--k", "0"], "--k 0: must be in [1, 10^6]"),
        (["linprobe", "--l2", "-1"], "--l2 -1.0"),
    ):
        assert main([*bad, *common]) == 2 and msg in capsys.readouterr().err
    assert main(["linprobe", *common, "--out", str(tmp_path / "lp.json")]) == 0
    lp = json.loads((tmp_path / "lp.json").read_text())
    assert lp["top1"] > 0.9 and lp["labels"] == knn["labels"]
    assert np.mean(np.equal(lp["predictions"], lp["labels"])) == pytest.approx(lp["top1"])
    ft = tmp_path / "ft"
    rc = main(_ft_args(data, ft, "--epochs", "6", "--mixup", "0.8", "--cutmix", "1.0"))
    assert rc == 0
    res = json.loads((ft / "result.json").read_text())
    assert res["best_top1"] >= 0.75 and len((ft / "metrics.jsonl").read_text().splitlines()) == 6
    assert "finetune top-1" in capsys.readouterr().out
    assert res["top5"] == 1.0  # two classes: the top two hold every label
    # mapet validate reads val as fine-tuning validated it: the same top-1
    val_args = ["--checkpoint", str(ft / "last.pt"), "--workers", "0", "--batch-size", "8", "--quiet"]
    assert main(["validate", *val_args, "--val", str(data / "val")]) == 0
    got = json.loads((ft / "validate-val.json").read_text())
    assert got["top1"] == res["top1"] and got["n_val"] == 24 and got["top5"] == 1.0
    assert "validate top-1" in capsys.readouterr().out
    assert main(["validate", "--checkpoint", str(tmp_path / "knn.json"), "--val", str(data / "val")]) == 2
    assert "re-create it with 'mapet finetune'" in capsys.readouterr().err
    assert main(_ft_args(data, ft, "--epochs", "6")) == 2  # a finished run is not overwritten
    assert "holds a fine-tuning run" in capsys.readouterr().err
    assert main(_ft_args(data, tmp_path / "bad", "--layer-decay", "0")) == 2
    assert "--layer-decay 0.0: must be in [1e-3, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    # the fine-tuned classifier exports to timm whole: same logits from timm's VisionTransformer
    timm = pytest.importorskip("timm")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pretrain.finetune import classifier_of

    assert main(["export", str(ft / "last.pt"), str(tmp_path / "ft.safetensors")]) == 0
    with safe_open(str(tmp_path / "ft.safetensors"), "pt") as f:
        args = json.loads(f.metadata()["timm_args"])
    ref = timm.models.vision_transformer.VisionTransformer(**args).eval()
    ref.load_state_dict(load_file(str(tmp_path / "ft.safetensors")), strict=True)
    ours = classifier_of(torch.load(ft / "last.pt", weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)


def _as_tar_shards(folder, out, shards=2):
    """folder's class sub-folders written as webdataset tars (key.png + key.cls holding the sorted class
    index), `shards` of them; returns their brace pattern."""
    classes = sorted(d.name for d in folder.iterdir())
    files = [(f, classes.index(d.name)) for d in sorted(folder.iterdir()) for f in sorted(d.iterdir())]
    for s in range(shards):
        members = [
            member
            for f, label in files[s::shards]
            for member in ((f.name, f.read_bytes()), (f"{f.stem}.cls", str(label).encode()))
        ]
        make_tar(out / f"{folder.name}-{s:03d}.tar", members)
    return str(out / f"{folder.name}-{{000..{shards - 1:03d}}}.tar")


def test_knn_linprobe_finetune_and_validate_read_tar_shards_as_they_read_folders(tmp_path, capsys):
    data = separable_folder(tmp_path / "data")
    (tmp_path / "wds").mkdir()
    train, val = (_as_tar_shards(data / split, tmp_path / "wds") for split in ("train", "val"))
    shards = ["--train", train, "--val", val]  # given last, they replace _eval_args' folders
    for cmd in ("knn", "linprobe"):
        assert main([cmd, *_eval_args(data), "--out", str(tmp_path / f"{cmd}-dir.json")]) == 0
        assert main([cmd, *_eval_args(data), *shards, "--out", str(tmp_path / f"{cmd}-tar.json")]) == 0
        a, b = (json.loads((tmp_path / f"{cmd}-{k}.json").read_text()) for k in ("dir", "tar"))
        assert b["n_val"] == a["n_val"] == 24 and b["top1"] == a["top1"] > 0.9, cmd
    missing = str(tmp_path / "wds" / "nope-{0..1}.tar")
    assert main(["knn", *_eval_args(data), "--train", missing]) == 2
    assert "nope-0.tar: tar shard not found" in capsys.readouterr().err

    ft = tmp_path / "ft"  # fine-tuned and validated on the shards; validate's JSON is named after them
    assert main([*_ft_args(data, ft, "--epochs", "1"), *shards]) == 0
    res = json.loads((ft / "result.json").read_text())
    assert res["n_val"] == 24
    assert (
        main(["validate", "--checkpoint", str(ft / "last.pt"), "--val", val, "--workers", "0", "--quiet"])
        == 0
    )
    assert json.loads((ft / "validate-val.json").read_text())["top1"] == res["top1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos, codebook_path):
    root = tmp_path_factory.mktemp("evalrun")
    tokens = tokenize(
        photos, codebook_path, root / "tokens", TokenizeConfig(shard_size=8, workers=0), progress=False
    )
    cfg = TrainConfig(
        tokens=str(tokens),
        out=str(root / "run"),
        model="mapet_micro",
        image_size=64,
        batch_size=4,
        epochs=1,
        workers=0,
    )
    return pretrain(cfg, progress=False)


def test_export_loads_into_timm_and_matches(run, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors import safe_open
    from safetensors.torch import load_file

    enc = load_vit(str(run))
    path = export(enc, tmp_path / "enc.safetensors")
    with safe_open(str(path), "pt") as f:
        args = json.loads(f.metadata()["timm_args"])
    ref = timm.models.vision_transformer.VisionTransformer(**args)
    missing, unexpected = ref.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(x), enc.forward_features(x), rtol=1e-5, atol=1e-5)
    cli_out = tmp_path / "new" / "folder" / "cli.safetensors"  # its folder is created
    assert main(["export", str(run), str(cli_out)]) == 0
    assert load_file(str(cli_out)).keys() == load_file(str(path)).keys()


def test_export_to_an_unwritable_path_is_a_one_line_error(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["export", str(run), str(tmp_path / "file" / "enc.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mapet: error: ") and str(tmp_path / "file") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_validate_refuses_a_pre_training_checkpoint(run, tmp_path, capsys):
    data = separable_folder(tmp_path / "data", n_per_class=2)
    assert main(["validate", "--checkpoint", str(run), "--val", str(data / "val"), "--quiet"]) == 2
    assert "not a 'mapet finetune' checkpoint; pass OUT/last.pt" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the planted file
def test_planted_pickle_checkpoint_is_refused(run, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "last.pt"
    bad.write_bytes(pickle.dumps({"kind": "mapet-checkpoint", "x": Evil()}))
    with pytest.raises(StoreError, match="weights-only"):
        load_checkpoint(bad)
    cut = tmp_path / "cut.pt"  # a checkpoint copied half-way
    cut.write_bytes(run.read_bytes()[: run.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        load_checkpoint(cut)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(StoreError, match="not a mapet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert load_checkpoint(run)["kind"] == "mapet-checkpoint"


def test_linear_probe_chooses_its_penalty_on_held_out_train_data():
    """20 overlapping classes: a weak penalty overfits 1,000 training points. The held-out choice lands within
    two points of the best penalty on the grid (judged on val, which the choice never sees) and far above the
    old fixed 1e-4."""
    from pretrain.evaluate import L2_GRID

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3000) % 20
    x = torch.randn(20, 64, generator=g)[y] * 0.3 + torch.randn(3000, 64, generator=g)
    auto = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    per = {
        c: linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], ProbeConfig(l2=c))["top1"] for c in L2_GRID
    }
    assert auto["l2"] in L2_GRID and set(auto["l2_sweep"]) == {f"{c:g}" for c in L2_GRID}
    assert auto["top1"] == pytest.approx(per[auto["l2"]])  # refitted on all of train with the choice
    assert auto["top1"] >= max(per.values()) - 0.02 and auto["top1"] > per[1e-4] + 0.08


def _ft_args(data, out, *extra):
    return ["finetune", *_eval_args(data), "--out", str(out), "--batch-size", "8", "--lr", "1e-3",
            "--warmup-epochs", "1", *extra]  # fmt: skip


AUGMENTED = ("--epochs", "3", "--mixup", "0.8", "--cutmix", "1.0", "--randaug", "--reprob", "0.25")


def test_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import pretrain.finetune as ft

    data = separable_folder(tmp_path / "data", n_per_class=8)
    assert main(_ft_args(data, tmp_path / "ref", *AUGMENTED)) == 0
    real, calls = ft.accuracy, []

    def dies_in_epoch_2(*a, **k):  # killed after epoch 1's checkpoint, before epoch 2's
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "accuracy", dies_in_epoch_2)
    assert (
        main(_ft_args(data, tmp_path / "run", *AUGMENTED)) != 0
    )  # the CLI reports the interrupt and exits non-zero
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(ft, "accuracy", real)
    # resumed with --grad-checkpointing: it changes memory, not the computation
    assert main(_ft_args(data, tmp_path / "run", *AUGMENTED, "--resume", "auto", "--grad-checkpointing")) == 0
    ref, got = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "ref", tmp_path / "run"))
    assert got["history"] == ref["history"] and len(got["history"]) == 3
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=0)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_text()
    # other settings are refused, naming what changed
    assert main(_ft_args(data, tmp_path / "run", *AUGMENTED, "--resume", "auto", "--lr", "2e-3")) == 2


def test_sigterm_mid_epoch_checkpoints_the_step_and_resumes_to_the_uninterrupted_run(tmp_path):
    """A SIGTERM to the whole job (loader workers too) during epoch 1's first step (2 steps per epoch):
    `mapet finetune` finishes that step, checkpoints it mid-epoch and exits 143 naming the checkpoint; the
    resumed run, with another loader worker count, ends with the weights, history and metrics of an
    uninterrupted run, every augmentation on (each draw keyed by image or by step, not by worker)."""
    data = separable_folder(tmp_path / "data", n_per_class=8)
    assert main(_ft_args(data, tmp_path / "ref", *AUGMENTED)) == 0  # --workers 0
    run = tmp_path / "run"
    args = [*_ft_args(data, run, *AUGMENTED), "--workers", "2"]  # the last --workers counts
    # random erasing runs once per micro-step: its 3rd call is epoch 1's first step
    rc, err = run_preempted("cli.mapet", "pretrain.finetune:random_erase", 3, args)
    assert rc == 143, err[-2000:]
    assert f"stopped by SIGTERM in epoch 1 at step 1 of 2: {run / 'last.pt'} holds it" in err
    assert "Traceback" not in err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["in_epoch"]["steps"] == 1 and len(ckpt["history"]) == 1
    assert main(_ft_args(data, run, *AUGMENTED, "--resume", "auto")) == 0
    ref, got = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "ref", run))
    assert got["history"] == ref["history"] and len(got["history"]) == 3
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=0)
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()


def test_a_finetune_sigterm_on_one_rank_stops_both_ranks_at_the_same_step(tmp_path):
    """Under torchrun the ranks agree on a SIGTERM every 10 optimizer steps: only rank 1 is signalled (in
    step 1); both train on to step 10 (of 12 in the epoch), rank 0 checkpoints it, both exit 143."""
    import os
    import subprocess
    import sys

    data = separable_folder(tmp_path / "data", n_per_class=12)  # 24 images: 12 steps of 1 per rank
    script = tmp_path / "job.py"
    script.write_text(
        preempt_script("cli.mapet", "pretrain.finetune:random_erase", 2, ranks=("1",), whole_group=False)
    )
    out = tmp_path / "ddp"
    args = _ft_args(data, out, "--epochs", "1", "--batch-size", "1", "--reprob", "0.25")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
           str(script), *args]  # fmt: skip
    r = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600
    )
    err = r.stderr.decode()
    assert (
        r.returncode != 0 and f"stopped by SIGTERM in epoch 0 at step 10 of 12: {out / 'last.pt'}" in err
    ), err[-3000:]
    assert "exitcode  : 143" in err and "Traceback" not in err.split("exitcode")[0]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == -1 and ckpt["in_epoch"]["steps"] == 10 and ckpt["history"] == []


def test_finetune_min_lr_is_the_schedules_floor(tmp_path):
    """--min-lr reaches the cosine schedule: the last step's lr (head group, no layer decay) lies between it
    and half the way up to --lr; a floor above --lr is refused naming the flag."""
    data = separable_folder(tmp_path / "data", n_per_class=8)
    flat = ("--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4")
    assert main(_ft_args(data, tmp_path / "ft", *flat, "--min-lr", "5e-4")) == 0
    ckpt = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert ckpt["config"]["min_lr"] == 5e-4
    head_lr = max(g["lr"] for g in ckpt["optimizer"]["param_groups"])  # lr_scale 1: fc_norm and head
    assert 5e-4 <= head_lr <= 7.5e-4, head_lr  # with the default 1e-6 it would be below 5e-4
    bad = _ft_args(data, tmp_path / "x", *flat, "--min-lr", "2e-3")
    assert main(bad) == 2 and not (tmp_path / "x").exists()


def test_finetune_accumulation_equals_the_larger_batch(tmp_path):
    """--accum-steps 2 at batch 4 takes the optimizer steps of batch 8 on the same images, drop path on (drawn
    per image): same weights."""
    data = separable_folder(tmp_path / "data", n_per_class=8)
    flat = ("--epochs", "2")
    assert main(_ft_args(data, tmp_path / "big", *flat, "--batch-size", "8")) == 0
    assert main(_ft_args(data, tmp_path / "acc", *flat, "--batch-size", "4", "--accum-steps", "2")) == 0
    big, acc = (torch.load(tmp_path / p / "last.pt", weights_only=True) for p in ("big", "acc"))
    assert big["model"].keys() == acc["model"].keys()
    for k in big["model"]:
        torch.testing.assert_close(acc["model"][k], big["model"][k], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in acc["history"]] == pytest.approx([r["loss"] for r in big["history"]], rel=1e-5)
    two_batches = _ft_args(data, tmp_path / "x", "--batch-size", "8", "--accum-steps", "3")
    assert main(two_batches) == 2 and not (tmp_path / "x").exists()  # 2 batches cannot fill a step of 3


def test_finetune_resumes_mid_epoch_on_another_split_of_the_same_global_batch(tmp_path, capsys):
    """Stopped by SIGTERM in epoch 1's first step at batch 8, resumed at batch 4 x 2 micro-steps (as on half the
    GPUs): with no draws per micro-step (mixup, cutmix, erasing off: the defaults; drop path is drawn per
    image) the same computation, so the uninterrupted run's weights and epoch losses (each the mean of its
    steps' losses, whatever their split); batch 4 alone is refused, naming the fix."""
    data = separable_folder(tmp_path / "data", n_per_class=8)  # 16 images: 2 steps of 8 per epoch
    plain = ("--epochs", "2")
    assert main(_ft_args(data, tmp_path / "ref", *plain)) == 0
    run = tmp_path / "run"
    rc, err = run_preempted("cli.mapet", "pretrain.finetune:_loss", 3, _ft_args(data, run, *plain))
    assert rc == 143 and "stopped by SIGTERM in epoch 1 at step 1 of 2" in err, err[-2000:]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["in_epoch"]["steps"] == 1 and ckpt["world"] == 1
    capsys.readouterr()
    assert main(_ft_args(data, run, *plain, "--batch-size", "4", "--resume", "auto")) == 2
    assert (
        "global batch is 8 (--batch-size 8 x --accum-steps 1 x 1 ranks), this launch's 4 (4 x 1 x 1); "
        "keep it: --accum-steps 2" in capsys.readouterr().err
    )
    resumed = [
        a for a in _ft_args(data, run, *plain, "--batch-size", "4", "--accum-steps", "2") if a != "--quiet"
    ]
    assert main([*resumed, "--resume", "auto"]) == 0
    assert (
        "classes; global batch 8 (4 x 2 x 1 ranks), 2 steps per epoch, 2 epochs, lr 0.001, layer decay 0.65, "
        "fp32 on cpu; resuming at epoch 1 step 1\n"
    ) in capsys.readouterr().out
    ref, got = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "ref", run))
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in got["history"]] == pytest.approx([r["loss"] for r in ref["history"]], rel=1e-5)
    assert [r["val_top1"] for r in got["history"]] == [r["val_top1"] for r in ref["history"]]


def test_compiled_finetune_trains_as_eager_does(tmp_path, monkeypatch):
    """--compile: the training step runs compiled (here through AOTAutograd's traced forward and backward,
    without inductor's code generation, to keep the test fast) and reaches eager's weights and losses;
    validation runs the eager module, drop path on (its draws are inputs). reduce-overhead with --accum-steps
    is refused before the run folder."""
    data = separable_folder(tmp_path / "data", n_per_class=8)
    real, modes = torch.compile, []

    def traced(m, *a, mode=None, **kw):
        modes.append(mode)
        return real(m, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", traced)
    flat = ("--epochs", "2")
    assert main(_ft_args(data, tmp_path / "eager", *flat)) == 0
    assert modes == []
    torch._dynamo.reset()
    assert main(_ft_args(data, tmp_path / "compiled", *flat, "--compile")) == 0
    assert modes == ["default"]
    eager, comp = (torch.load(tmp_path / p / "last.pt", weights_only=True) for p in ("eager", "compiled"))
    for k in eager["model"]:
        torch.testing.assert_close(comp["model"][k], eager["model"][k], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in comp["history"]] == pytest.approx(
        [r["loss"] for r in eager["history"]], rel=1e-5
    )
    assert [r["val_top1"] for r in comp["history"]] == [r["val_top1"] for r in eager["history"]]
    bad = _ft_args(data, tmp_path / "x", "--compile", "reduce-overhead", "--accum-steps", "2")
    assert main(bad) == 2 and not (tmp_path / "x").exists()


def test_two_rank_finetune_resumes_a_one_process_run_and_validates_every_sample_once(tmp_path, monkeypatch):
    """A one-process run at batch 8, killed after epoch 0, resumed under torchrun (gloo) at 2 ranks x batch 2
    x 2 micro-steps (the same global batch): both ranks train epoch 1 as one DDP model (the first micro-batch
    without an all-reduce) and the reported top-1 is that model's on all of val."""
    import os
    import subprocess
    import sys

    import pretrain.finetune as ft
    from pretrain.data import to_input
    from pretrain.evaluate import CenterCropDataset
    from pretrain.finetune import classifier_of
    from tokenkit.images import list_folder

    data = separable_folder(tmp_path / "data", n_per_class=7)  # 14 val images: odd per rank split is 7 / 7
    out = tmp_path / "ddp"
    real, calls = ft.accuracy, []

    def dies_in_epoch_1(*a, **k):  # killed after epoch 0's checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "accuracy", dies_in_epoch_1)
    assert main(_ft_args(data, out, "--epochs", "2")) != 0
    first = torch.load(out / "last.pt", weights_only=True)
    assert first["epoch"] == 0 and first["world"] == 1
    args = _ft_args(data, out, "--epochs", "2", "--batch-size", "2", "--accum-steps", "2", "--resume", "auto")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "cli.mapet", *args]  # fmt: skip
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world"] == 2 and ckpt["history"][0] == first["history"][0] and len(ckpt["history"]) == 2
    model = classifier_of(ckpt)
    val = CenterCropDataset(list_folder(data / "val"), 64)
    x, y = zip(*(val[i] for i in range(len(val))), strict=True)
    with torch.no_grad():
        pred = model(to_input(torch.stack(x), "cpu")).argmax(1)
    want = float((pred == torch.tensor(y)).float().mean())
    res = json.loads((out / "result.json").read_text())
    assert res["n_val"] == 14 and res["top1"] == pytest.approx(want)


def test_exported_encoder_loads_back_for_evaluation(run, tmp_path):
    enc = load_vit(str(run))
    back = load_vit(str(export(enc, tmp_path / "enc.safetensors")))
    assert back.cfg.heads == enc.cfg.heads and back.cfg.grid == enc.cfg.grid
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), enc.forward_features(x), rtol=1e-6, atol=1e-6)


def test_a_timm_vit_is_judged_by_the_same_protocol(tmp_path, capsys):
    """A plain timm ViT (no LayerScale, a classifier head, 2 heads of 64) saved as safetensors: the same
    features through load_timm, k-NN from the CLI, and a one-line refusal of a ViT with register tokens."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    ViT = timm.models.vision_transformer.VisionTransformer
    torch.manual_seed(0)
    ref = ViT(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, num_classes=10).eval()
    for p in ref.parameters():  # timm zero-initialises some biases: make every tensor count
        p.data.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "timm-vit.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = load_vit(str(path))
    assert (enc.cfg.image_size, enc.cfg.dim, enc.cfg.depth, enc.cfg.heads) == (64, 128, 2, 2)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    data = separable_folder(tmp_path / "data")
    assert main(["knn", *_eval_args(data, path), "--out", str(tmp_path / "knn.json")]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())["top1"] > 0.75
    regs = ViT(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, reg_tokens=4)
    save_file(regs.state_dict(), str(tmp_path / "regs.safetensors"))
    assert main(["knn", *_eval_args(data, tmp_path / "regs.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "reg_token" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_at_another_image_size(run, tmp_path):
    """--image-size with a checkpoint resamples its positions (not ignored); --patch-size cannot change."""
    enc = load_vit(str(run), image_size=96)
    assert enc.cfg.image_size == 96 and enc.pos_embed.shape[1] == 1 + 36
    with pytest.raises(ConfigError, match="patch size 16"):
        load_vit(str(run), patch_size=8)
    with pytest.raises(ConfigError, match="not a multiple"):
        load_vit(str(run), image_size=100)
    for checkpoint in (str(run), "random"):  # 0 is refused, not taken for "the default"
        with pytest.raises(ConfigError, match=r"--image-size 0: must be in \[1, 8192\]"):
            load_vit(checkpoint, "mapet_micro", image_size=0)
        with pytest.raises(ConfigError, match=r"--patch-size 0: must be in \[1, 8192\]"):
            load_vit(checkpoint, "mapet_micro", patch_size=0)


def test_val_classes_are_matched_to_train_classes_by_name(tmp_path, capsys):
    """A val folder without one of train's classes keeps its labels' meaning (per-folder indices would turn
    every 'warm' into class 0, 'cool'); a val class train lacks is refused."""
    import shutil

    from pretrain.evaluate import labelled_pair

    data = separable_folder(tmp_path / "data")
    shutil.rmtree(data / "val" / "cool")
    train, val = labelled_pair(data / "train", data / "val")
    assert train.classes == val.classes == ("cool", "warm") and set(val.labels.tolist()) == {1}
    out = tmp_path / "knn.json"
    assert main(["knn", *_eval_args(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] > 0.9
    shutil.copytree(data / "val" / "warm", data / "val" / "hot")
    assert main(["knn", *_eval_args(data)]) == 2
    assert "classes hot are not among" in capsys.readouterr().err


def test_validate_matches_val_classes_to_the_fine_tuned_ones_by_name(tmp_path, capsys):
    """A val folder holding only 'warm' (class 1 of the fine-tuned head, class 0 of its own folder listing)
    is scored against class 1: the classifier's own accuracy on those images; an unknown class is refused."""
    import shutil

    from pretrain.checkpoint import FINETUNE_KIND
    from pretrain.data import to_input
    from pretrain.evaluate import CenterCropDataset, labelled_source
    from pretrain.finetune import classifier_of

    data = separable_folder(tmp_path / "data")
    ft = tmp_path / "ft"
    assert main(_ft_args(data, ft, "--epochs", "2")) == 0
    net = classifier_of(load_checkpoint(ft / "last.pt", kind=FINETUNE_KIND))
    assert load_checkpoint(ft / "last.pt", kind=FINETUNE_KIND)["classes"] == ["cool", "warm"]
    ds = CenterCropDataset(labelled_source(data / "val"), 64)
    x, y = (
        torch.stack(t)
        for t in zip(*[(ds[i][0], torch.tensor(ds[i][1])) for i in range(len(ds))], strict=True)
    )
    with torch.no_grad():
        pred = net(to_input(x, torch.device("cpu"))).argmax(1)
    warm = float((pred[y == 1] == 1).float().mean())
    shutil.rmtree(data / "val" / "cool")
    out = tmp_path / "warm.json"
    args = ["validate", "--checkpoint", str(ft / "last.pt"), "--workers", "0", "--quiet", "--out", str(out)]
    assert main([*args, "--val", str(data / "val")]) == 0
    got = json.loads(out.read_text())
    assert got["n_val"] == 12 and got["top1"] == pytest.approx(warm)
    shutil.copytree(data / "val" / "warm", data / "val" / "hot")
    assert main([*args, "--val", str(data / "val")]) == 2
    assert "classes hot are not among" in capsys.readouterr().err


def test_unreadable_images_are_left_out_and_counted_and_none_readable_is_an_error(tmp_path, capsys):
    from pretrain.evaluate import extract
    from tokenkit.errors import SourceError
    from tokenkit.images import list_source

    data = separable_folder(tmp_path / "data", n_per_class=3)
    (data / "val" / "warm" / "warm_0.png").write_bytes(b"not a png")
    enc = load_vit("random", "mapet_micro", image_size=64)
    f, y = extract(enc, list_source(data / "val"), workers=0, progress=False)
    assert len(f) == len(y) == 5 and "1 of 6 images unreadable" in capsys.readouterr().err
    for p in (data / "val").rglob("*.png"):
        p.write_bytes(b"not a png")
    with pytest.raises(SourceError, match="none of its 6 images could be read"):
        extract(enc, list_source(data / "val"), workers=0, progress=False)


def test_a_bad_training_image_in_a_loader_worker_is_one_line_naming_the_file(tmp_path):
    """... and the process ends (exit 2): its loader workers ignore SIGTERM, so one left to interpreter exit
    (kept alive by the error's traceback) would keep it waiting forever."""
    import subprocess
    import sys

    data = separable_folder(tmp_path / "data", n_per_class=3)
    bad = data / "train" / "cool" / "cool_1.png"
    bad.write_bytes(b"not a png")
    args = _ft_args(data, tmp_path / "ft", "--epochs", "1", "--workers", "2", "--batch-size", "2")
    r = subprocess.run([sys.executable, "-m", "cli.mapet", *args], cwd=ROOT, capture_output=True, timeout=120)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err[-2000:]
    # one line of ours (an old dependency may add its own warnings before it), no traceback
    assert err.splitlines()[-1].startswith(f"mapet: error: {bad}: not a usable image")
    assert err.count("mapet: ") == 1 and "Traceback" not in err


@pytest.mark.parametrize("size", [224, 64])
def test_eval_view_is_torchvisions_resize_then_center_crop(tmp_path, size):
    """The evaluation view (one PIL resize of a box) gives the pixels of the DINO / MAE / BEiT eval pipeline,
    Resize(floor(S / crop_pct), bicubic) + CenterCrop(S), on photos of several aspect ratios."""
    import math

    import skimage.data
    from torchvision.transforms import v2

    from pretrain.evaluate import CenterCropDataset
    from tokenkit.images import list_folder

    names = ("astronaut", "chelsea", "coffee", "rocket")  # 512x512, 451x300, 600x400, 640x427
    (tmp_path / "c").mkdir()
    for n in names:
        Image.fromarray(getattr(skimage.data, n)()).save(tmp_path / "c" / f"{n}.png")
    src = list_folder(tmp_path)
    # the default: 224 / 256 below 384 px, no crop from 384 px on (BEiT's and DeiT's evaluation)
    assert CenterCropDataset(src, size).crop_pct == 0.875 and CenterCropDataset(src, 384).crop_pct == 1.0
    for crop_pct in (0.875, 1.0):
        ds = CenterCropDataset(src, size, crop_pct)
        ref = v2.Compose(
            [v2.Resize(math.floor(size / crop_pct), v2.InterpolationMode.BICUBIC), v2.CenterCrop(size)]
        )
        for i in range(len(src)):
            want = np.asarray(
                ref(Image.open(tmp_path / "c" / f"{src.keys[i].split('/')[-1]}.png").convert("RGB"))
            )
            got = ds[i][0].numpy()
            diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
            assert got.shape == (size, size, 3) and diff.max() <= 1 and diff.mean() < 0.01, (crop_pct, i)


def test_randaugment_has_the_statistics_of_timms_rand_m9_mstd05():
    """Each op applied with probability 0.5 at timm's magnitude scale: how often an image comes out untouched
    and how far the rest move match timm's rand-m9-mstd0.5 (torchvision's RandAugment(2, 9) leaves ~5% of
    images untouched, timm ~28%)."""
    import skimage.data

    pytest.importorskip("timm")
    from timm.data.auto_augment import rand_augment_transform

    from pretrain.finetune import RandAugment

    img = Image.fromarray(skimage.data.astronaut()).resize((96, 96))
    base = np.asarray(img, dtype=np.float32)

    def stats(tf):
        torch.manual_seed(0)
        np.random.seed(0)
        import random

        random.seed(0)
        d = np.array([np.abs(np.asarray(tf(img), dtype=np.float32) - base).mean() for _ in range(400)])
        return (d < 0.5).mean(), d.mean()

    ours = stats(RandAugment())
    theirs = stats(rand_augment_transform("rand-m9-mstd0.5", {"img_mean": (124, 116, 104)}))
    assert abs(ours[0] - theirs[0]) < 0.1, (ours, theirs)
    assert abs(ours[1] / theirs[1] - 1) < 0.25, (ours, theirs)


def test_random_erasing_draws_one_noise_box_per_erased_sample():
    from pretrain.finetune import random_erase

    torch.manual_seed(0)
    x = torch.full((600, 3, 32, 40), 7.0)  # a value N(0, 1) noise never takes
    assert torch.equal(random_erase(x.clone(), 0.0), x)
    out = random_erase(x.clone(), 0.25)
    erased = out != 7.0  # (B, 3, S, W)
    hit = erased.flatten(1).any(1)
    assert abs(float(hit.float().mean()) - 0.25) < 0.05
    boxes = set()
    for i in hit.nonzero().flatten().tolist():
        m = erased[i, 0]
        assert torch.equal(erased[i], m.expand(3, -1, -1))  # the same box in every channel
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert int(m.sum()) == h * w  # one solid rectangle
        assert 0.015 <= h * w / (32 * 40) <= 0.36 and 0.2 <= h / w <= 5
        boxes.add((int(rows[0]), int(cols[0]), h, w))
    noise = out[erased]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    assert len(boxes) > 0.9 * int(hit.sum())  # drawn per sample, not one box for the batch


def test_layer_decay_scales_are_beits():
    """BEiT's layer-wise lr decay: patch embedding, CLS and positions at layer 0, block i at layer i + 1,
    fc_norm and head at depth + 1; scale decay ** (depth + 1 - layer). No weight decay on norms, biases,
    CLS and positions."""
    from pretrain.finetune import Classifier
    from pretrain.optim import layer_decay_groups
    from pretrain.vit import PRESETS, VisionTransformer, ViTConfig

    net = Classifier(VisionTransformer(ViTConfig(**PRESETS["mapet_micro"])), 3)
    depth, decay = len(net.encoder.blocks), 0.65
    groups = layer_decay_groups(net, 0.05, decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(scale) == sum(1 for _ in net.parameters())  # every parameter in exactly one group
    for name, p in net.named_parameters():
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("fc_norm", "head")):
            layer = depth + 1
        else:
            layer = 0
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - layer)), name
        flat = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        assert wd[id(p)] == (0.0 if flat else 0.05), name
    assert scale[id(net.encoder.patch_embed.weight)] == pytest.approx(0.65**5)  # micro: depth 4
    assert scale[id(net.head.weight)] == 1.0
