"""Evaluation (pretrain/evaluate.py): k-NN and the linear probe beat chance on separable data, McNemar's test, the
evaluation view, classes matched by name, images read from folders, tars and stores."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli.mapet import main
from pretrain.evaluate import ProbeConfig, knn_classify, linear_probe, load_vit, mcnemar
from tests.runs import eval_args, ft_args, pretrained_run, separable_folder
from tests.tars import make_tar
from tokenkit.errors import ConfigError


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
    common = eval_args(data)
    assert main(["knn", *common, "--result", str(tmp_path / "knn.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["top1"] > 0.9 and knn["n_val"] == 24 and knn["majority_baseline"] == 0.5
    assert knn["k"] == 20 and knn["image_size"] == 64
    # each val image's label and answer, in val order: the top-1 is theirs
    assert len(knn["predictions"]) == len(knn["labels"]) == 24
    assert np.mean(np.equal(knn["predictions"], knn["labels"])) == pytest.approx(knn["top1"])
    assert main(["knn", *common, "--k", "100", "--result", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["k"] == 24  # the k used: every training image
    for bad, msg in (
        (["knn", "--k", "0"], "--k 0: must be in [1, 10^6]"),
        (["linprobe", "--l2", "-1"], "--l2 -1.0"),
    ):
        assert main([*bad, *common]) == 2 and msg in capsys.readouterr().err
    assert main(["linprobe", *common, "--result", str(tmp_path / "lp.json")]) == 0
    lp = json.loads((tmp_path / "lp.json").read_text())
    assert lp["top1"] > 0.9 and lp["labels"] == knn["labels"]
    assert np.mean(np.equal(lp["predictions"], lp["labels"])) == pytest.approx(lp["top1"])
    ft = tmp_path / "ft"
    rc = main(ft_args(data, ft, "--epochs", "6", "--mixup", "0.8", "--cutmix", "1.0"))
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
    assert main(ft_args(data, ft, "--epochs", "6")) == 2  # a finished run is not overwritten
    assert "holds a fine-tuning run" in capsys.readouterr().err
    assert main(ft_args(data, tmp_path / "bad", "--layer-decay", "0")) == 2
    assert "--layer-decay 0.0: must be in [1e-3, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    # the fine-tuned classifier exports to timm whole: same logits, its class names
    timm = pytest.importorskip("timm")

    from pretrain.finetune import classifier_of

    assert main(["export", str(ft / "last.pt"), str(tmp_path / "ft-timm")]) == 0
    ref = timm.create_model(f"local-dir:{tmp_path / 'ft-timm'}", pretrained=True).eval()
    assert ref.pretrained_cfg["label_names"] == ["cool", "warm"]
    ours = classifier_of(torch.load(ft / "last.pt", weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)
    answers = []  # mapet validate gives the folder the checkpoint's answers (4 heads of 32: read, not guessed)
    for name, ck in (("pt", ft / "last.pt"), ("folder", tmp_path / "ft-timm")):
        val = [
            "--val",
            str(data / "val"),
            "--workers",
            "0",
            "--quiet",
            "--result",
            str(tmp_path / f"v-{name}.json"),
        ]
        assert main(["validate", "--checkpoint", str(ck), *val]) == 0
        answers.append(json.loads((tmp_path / f"v-{name}.json").read_text())["predictions"])
    assert answers[0] == answers[1]


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
        assert main([cmd, *eval_args(data), "--result", str(tmp_path / f"{cmd}-dir.json")]) == 0
        assert main([cmd, *eval_args(data), *shards, "--result", str(tmp_path / f"{cmd}-tar.json")]) == 0
        a, b = (json.loads((tmp_path / f"{cmd}-{k}.json").read_text()) for k in ("dir", "tar"))
        assert b["n_val"] == a["n_val"] == 24 and b["top1"] == a["top1"] > 0.9, cmd
    missing = str(tmp_path / "wds" / "nope-{0..1}.tar")
    assert main(["knn", *eval_args(data), "--train", missing]) == 2
    assert "nope-0.tar: tar shard not found" in capsys.readouterr().err

    ft = tmp_path / "ft"  # fine-tuned and validated on the shards; validate's JSON is named after them
    assert main([*ft_args(data, ft, "--epochs", "1"), *shards]) == 0
    res = json.loads((ft / "result.json").read_text())
    assert res["n_val"] == 24
    assert (
        main(["validate", "--checkpoint", str(ft / "last.pt"), "--val", val, "--workers", "0", "--quiet"])
        == 0
    )
    assert json.loads((ft / "validate-val.json").read_text())["top1"] == res["top1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos, codebook_path):
    return pretrained_run(tmp_path_factory.mktemp("evalrun"), photos, codebook_path)


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
    assert main(["knn", *eval_args(data), "--result", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] > 0.9
    shutil.copytree(data / "val" / "warm", data / "val" / "hot")
    assert main(["knn", *eval_args(data)]) == 2
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
