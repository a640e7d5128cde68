"""Export (pretrain/export.py): timm key names in and out; a timm ViT judged by the same protocol."""

import json
import pickle

import pytest
import torch

from cli.mapet import main
from pretrain.checkpoint import load_checkpoint
from pretrain.data import IMAGENET_MEAN
from pretrain.evaluate import default_crop_pct, load_vit
from tests.runs import eval_args, pretrained_run, separable_folder
from tokenkit.errors import StoreError


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos, codebook_path):
    return pretrained_run(tmp_path_factory.mktemp("evalrun"), photos, codebook_path)


def test_export_folder_is_a_timm_model(run, tmp_path, capsys):
    """`mapet export RUN/last.pt DIR`: timm.create_model("local-dir:DIR", pretrained=True) builds it with our
    weights, its pooled output is the features k-NN and the linear probe judge, timm's data config is ours,
    and the folder has a model card; k-NN reads the folder too."""
    timm = pytest.importorskip("timm")

    out = tmp_path / "new" / "mapet-micro"  # its parent is created
    assert main(["export", str(run), str(out)]) == 0
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    enc = load_vit(str(run))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), enc.forward_head(enc.forward_features(x), "avg"), rtol=1e-5, atol=1e-5
        )
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 64, 64) and data["interpolation"] == "bicubic"
    assert data["mean"] == pytest.approx(IMAGENET_MEAN) and data["crop_pct"] == default_crop_pct(64)
    card = (out / "README.md").read_text()
    assert "pre-trained with MaPeT" in card and "K = 16" in card and f"local-dir:{out}" in card
    back = load_vit(str(out))
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), enc.forward_features(x), rtol=1e-6, atol=1e-6)
    assert main(["export", str(run), str(out)]) == 0  # an earlier export is replaced
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(run), str(out)]) == 2  # a folder holding anything else is not
    assert "not an exported model folder" in capsys.readouterr().err and (out / "notes.txt").exists()


def test_export_to_an_unwritable_path_is_a_one_line_error(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["export", str(run), str(tmp_path / "file" / "enc")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mapet: error: ") and str(tmp_path / "file") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob(".*tmp*"))


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
    assert main(["knn", *eval_args(data, path), "--result", str(tmp_path / "knn.json")]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())["top1"] > 0.75
    regs = ViT(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2, reg_tokens=4)
    save_file(regs.state_dict(), str(tmp_path / "regs.safetensors"))
    assert main(["knn", *eval_args(data, tmp_path / "regs.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "reg_token" in err and len(err.strip().splitlines()) == 1


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
