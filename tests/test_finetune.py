"""Fine-tuning (pretrain/finetune.py) and `mapet validate`: resumes and stops as pre-training does, one global batch split any way, compiled as eager, BEiT's augmentations and layer decay."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli.mapet import main
from pretrain.checkpoint import load_checkpoint
from tests.preempt import ROOT, preempt_script, run_preempted
from tests.runs import ft_args, pretrained_run, separable_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos, codebook_path):
    return pretrained_run(tmp_path_factory.mktemp("evalrun"), photos, codebook_path)


AUGMENTED = ("--epochs", "3", "--mixup", "0.8", "--cutmix", "1.0", "--randaug", "--reprob", "0.25")


def test_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import pretrain.finetune as ft

    data = separable_folder(tmp_path / "data", n_per_class=8)
    assert main(ft_args(data, tmp_path / "ref", *AUGMENTED)) == 0
    real, calls = ft.accuracy, []

    def dies_in_epoch_2(*a, **k):  # killed after epoch 1's checkpoint, before epoch 2's
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "accuracy", dies_in_epoch_2)
    assert (
        main(ft_args(data, tmp_path / "run", *AUGMENTED)) != 0
    )  # the CLI reports the interrupt and exits non-zero
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(ft, "accuracy", real)
    # resumed with --grad-checkpointing: it changes memory, not the computation
    assert main(ft_args(data, tmp_path / "run", *AUGMENTED, "--resume", "auto", "--grad-checkpointing")) == 0
    ref, got = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "ref", tmp_path / "run"))
    assert got["history"] == ref["history"] and len(got["history"]) == 3
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=0)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_text()
    # other settings are refused, naming what changed
    assert main(ft_args(data, tmp_path / "run", *AUGMENTED, "--resume", "auto", "--lr", "2e-3")) == 2


def test_sigterm_mid_epoch_checkpoints_the_step_and_resumes_to_the_uninterrupted_run(tmp_path):
    """A SIGTERM to the whole job (loader workers too) during epoch 1's first step (2 steps per epoch):
    `mapet finetune` finishes that step, checkpoints it mid-epoch and exits 143 naming the checkpoint; the
    resumed run, with another loader worker count, ends with the weights, history and metrics of an
    uninterrupted run, every augmentation on (each draw keyed by image or by step, not by worker)."""
    data = separable_folder(tmp_path / "data", n_per_class=8)
    assert main(ft_args(data, tmp_path / "ref", *AUGMENTED)) == 0  # --workers 0
    run = tmp_path / "run"
    args = [*ft_args(data, run, *AUGMENTED), "--workers", "2"]  # the last --workers counts
    # random erasing runs once per micro-step: its 3rd call is epoch 1's first step
    rc, err = run_preempted("cli.mapet", "pretrain.finetune:random_erase", 3, args)
    assert rc == 143, err[-2000:]
    assert f"stopped by SIGTERM in epoch 1 at step 1 of 2: {run / 'last.pt'} holds it" in err
    assert "Traceback" not in err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["in_epoch"]["steps"] == 1 and len(ckpt["history"]) == 1
    assert main(ft_args(data, run, *AUGMENTED, "--resume", "auto")) == 0
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
    args = ft_args(data, out, "--epochs", "1", "--batch-size", "1", "--reprob", "0.25")
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
    assert main(ft_args(data, tmp_path / "ft", *flat, "--min-lr", "5e-4")) == 0
    ckpt = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert ckpt["config"]["min_lr"] == 5e-4
    head_lr = max(g["lr"] for g in ckpt["optimizer"]["param_groups"])  # lr_scale 1: fc_norm and head
    assert 5e-4 <= head_lr <= 7.5e-4, head_lr  # with the default 1e-6 it would be below 5e-4
    bad = ft_args(data, tmp_path / "x", *flat, "--min-lr", "2e-3")
    assert main(bad) == 2 and not (tmp_path / "x").exists()


def test_finetune_accumulation_equals_the_larger_batch(tmp_path):
    """--accum-steps 2 at batch 4 takes the optimizer steps of batch 8 on the same images, drop path on (drawn
    per image): same weights."""
    data = separable_folder(tmp_path / "data", n_per_class=8)
    flat = ("--epochs", "2")
    assert main(ft_args(data, tmp_path / "big", *flat, "--batch-size", "8")) == 0
    assert main(ft_args(data, tmp_path / "acc", *flat, "--batch-size", "4", "--accum-steps", "2")) == 0
    big, acc = (torch.load(tmp_path / p / "last.pt", weights_only=True) for p in ("big", "acc"))
    assert big["model"].keys() == acc["model"].keys()
    for k in big["model"]:
        torch.testing.assert_close(acc["model"][k], big["model"][k], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in acc["history"]] == pytest.approx([r["loss"] for r in big["history"]], rel=1e-5)
    two_batches = ft_args(data, tmp_path / "x", "--batch-size", "8", "--accum-steps", "3")
    assert main(two_batches) == 2 and not (tmp_path / "x").exists()  # 2 batches cannot fill a step of 3


def test_finetune_resumes_mid_epoch_on_another_split_of_the_same_global_batch(tmp_path, capsys):
    """Stopped by SIGTERM in epoch 1's first step at batch 8, resumed at batch 4 x 2 micro-steps (as on half the
    GPUs): with no draws per micro-step (mixup, cutmix, erasing off: the defaults; drop path is drawn per
    image) the same computation, so the uninterrupted run's weights and epoch losses (each the mean of its
    steps' losses, whatever their split); batch 4 alone is refused, naming the fix."""
    data = separable_folder(tmp_path / "data", n_per_class=8)  # 16 images: 2 steps of 8 per epoch
    plain = ("--epochs", "2")
    assert main(ft_args(data, tmp_path / "ref", *plain)) == 0
    run = tmp_path / "run"
    rc, err = run_preempted("cli.mapet", "pretrain.finetune:_loss", 3, ft_args(data, run, *plain))
    assert rc == 143 and "stopped by SIGTERM in epoch 1 at step 1 of 2" in err, err[-2000:]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["in_epoch"]["steps"] == 1 and ckpt["world"] == 1
    capsys.readouterr()
    assert main(ft_args(data, run, *plain, "--batch-size", "4", "--resume", "auto")) == 2
    assert (
        "global batch is 8 (--batch-size 8 x --accum-steps 1 x 1 ranks), this launch's 4 (4 x 1 x 1); "
        "keep it: --accum-steps 2" in capsys.readouterr().err
    )
    resumed = [
        a for a in ft_args(data, run, *plain, "--batch-size", "4", "--accum-steps", "2") if a != "--quiet"
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
    assert main(ft_args(data, tmp_path / "eager", *flat)) == 0
    assert modes == []
    torch._dynamo.reset()
    assert main(ft_args(data, tmp_path / "compiled", *flat, "--compile")) == 0
    assert modes == ["default"]
    eager, comp = (torch.load(tmp_path / p / "last.pt", weights_only=True) for p in ("eager", "compiled"))
    for k in eager["model"]:
        torch.testing.assert_close(comp["model"][k], eager["model"][k], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in comp["history"]] == pytest.approx(
        [r["loss"] for r in eager["history"]], rel=1e-5
    )
    assert [r["val_top1"] for r in comp["history"]] == [r["val_top1"] for r in eager["history"]]
    bad = ft_args(data, tmp_path / "x", "--compile", "reduce-overhead", "--accum-steps", "2")
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
    assert main(ft_args(data, out, "--epochs", "2")) != 0
    first = torch.load(out / "last.pt", weights_only=True)
    assert first["epoch"] == 0 and first["world"] == 1
    args = ft_args(data, out, "--epochs", "2", "--batch-size", "2", "--accum-steps", "2", "--resume", "auto")
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
    assert main(ft_args(data, ft, "--epochs", "2")) == 0
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
    args = [
        "validate",
        "--checkpoint",
        str(ft / "last.pt"),
        "--workers",
        "0",
        "--quiet",
        "--result",
        str(out),
    ]
    assert main([*args, "--val", str(data / "val")]) == 0
    got = json.loads(out.read_text())
    assert got["n_val"] == 12 and got["top1"] == pytest.approx(warm)
    shutil.copytree(data / "val" / "warm", data / "val" / "hot")
    assert main([*args, "--val", str(data / "val")]) == 2
    assert "classes hot are not among" in capsys.readouterr().err


def test_a_bad_training_image_in_a_loader_worker_is_one_line_naming_the_file(tmp_path):
    """... and the process ends (exit 2): its loader workers ignore SIGTERM, so one left to interpreter exit
    (kept alive by the error's traceback) would keep it waiting forever."""
    import subprocess
    import sys

    data = separable_folder(tmp_path / "data", n_per_class=3)
    bad = data / "train" / "cool" / "cool_1.png"
    bad.write_bytes(b"not a png")
    args = ft_args(data, tmp_path / "ft", "--epochs", "2", "--workers", "2", "--batch-size", "2")
    r = subprocess.run([sys.executable, "-m", "cli.mapet", *args], cwd=ROOT, capture_output=True, timeout=120)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err[-2000:]
    # one line of ours (an old dependency may add its own warnings before it), no traceback
    assert err.splitlines()[-1].startswith(f"mapet: error: {bad}: not a usable image")
    assert err.count("mapet: ") == 1 and "Traceback" not in err


def test_validate_refuses_a_pre_training_checkpoint(run, tmp_path, capsys):
    data = separable_folder(tmp_path / "data", n_per_class=2)
    assert main(["validate", "--checkpoint", str(run), "--val", str(data / "val"), "--quiet"]) == 2
    assert "not a 'mapet finetune' checkpoint; pass OUT/last.pt" in capsys.readouterr().err
