"""`mapet import-official` (pretrain/official.py): checkpoints in the released layouts of MaPeT, BEiT / BEiT
v2 and MAE, built here from a seeded timm ViT, become model folders that compute what the timm ViT computes."""

import argparse
import json

import pytest
import torch

from cli.mapet import main
from pretrain.evaluate import load_vit
from tests.runs import eval_args, separable_folder

timm = pytest.importorskip("timm")
ViT = timm.models.vision_transformer.VisionTransformer
GEOMETRY = dict(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2)


def reference(**kw):
    """A seeded timm ViT with every tensor away from its init (timm zero-initialises some)."""
    torch.manual_seed(0)
    ref = ViT(**GEOMETRY, **kw).eval()
    for p in ref.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return ref


def test_released_mapet_classifier_is_imported_whole(tmp_path, capsys):
    """aimagelab/MaPeT's vit_standard_* layout: separate q and kv linears, fc_norm and head, in a timm
    CheckpointSaver dict with its argparse `args`."""
    ref = reference(init_values=0.1, global_pool="avg", fc_norm=True, num_classes=2)
    sd = {}
    for k, v in ref.state_dict().items():
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            b, leaf = k.rsplit(".qkv.", 1)
            sd[f"{b}.q.{leaf}"], sd[f"{b}.kv.{leaf}"] = v[:128], v[128:]
        else:
            sd[k] = v
    ckpt = tmp_path / "vit_standard_tiny_patch16_224_KCLIP.tar"
    torch.save({"epoch": 99, "arch": "vit_standard_tiny_patch16_224", "state_dict": sd,
                "args": argparse.Namespace(lr=5e-3, model="vit_standard_tiny_patch16_224")}, ckpt)  # fmt: skip
    out = tmp_path / "mapet-t"
    assert main(["import-official", str(ckpt), str(out)]) == 0
    assert "(mapet layout)" in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    data = separable_folder(tmp_path / "data", n_per_class=3)  # `mapet validate` scores the folder
    assert main(["validate", "--checkpoint", str(out), "--val", str(data / "val"), "--workers", "0", "--quiet",
                 "--result", str(tmp_path / "v.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "v.json").read_text())["n_val"] == 6


@pytest.mark.parametrize("layout", ["beit", "mae"])
def test_pretrained_beit_and_mae_encoders_are_read_by_a_table(layout, tmp_path, capsys):
    if layout == "beit":  # BEiT: q and v biases only, LayerScale as gamma_1 / gamma_2, its pre-training head
        ref = reference(init_values=0.1, num_classes=0)
        ref.blocks[0].attn.qkv.bias.data[128:256] = 0  # BEiT has no k bias
        ref.blocks[1].attn.qkv.bias.data[128:256] = 0
        sd = {}
        for k, v in ref.state_dict().items():
            if k.endswith("attn.qkv.bias"):
                b = k.removesuffix("qkv.bias")
                sd[b + "q_bias"], sd[b + "v_bias"] = v[:128], v[256:]
            else:
                sd[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
        sd |= {"lm_head.weight": torch.randn(8192, 128), "mask_token": torch.zeros(1, 1, 128)}
    else:  # MAE: timm's names, the decoder beside them
        ref = reference(num_classes=0)
        sd = {**ref.state_dict(), "mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(64, 128),
              "decoder_blocks.0.mlp.fc1.weight": torch.randn(256, 64)}  # fmt: skip
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"model": sd, "epoch": 799}, ckpt)
    out = tmp_path / layout
    assert main(["import-official", str(ckpt), str(out)]) == 0
    assert f"({layout} layout)" in capsys.readouterr().out
    enc = load_vit(str(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    data = separable_folder(tmp_path / "data", n_per_class=4)
    assert main(["knn", *eval_args(data, out), "--result", str(tmp_path / "knn.json")]) == 0
    if layout == "beit":  # relative position bias: refused in one line
        sd["rel_pos_bias.relative_position_bias_table"] = torch.zeros(732, 2)
        torch.save({"model": sd}, ckpt)
        assert main(["import-official", str(ckpt), str(tmp_path / "rel")]) == 2
        err = capsys.readouterr().err
        assert "relative position bias" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "rel").exists()
