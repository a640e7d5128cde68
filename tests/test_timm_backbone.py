"""timm ViT backbones (tokenkit/encoders/timm_backbone.py): timm's own forward_intermediates, prefix tokens
dropped, the grid from the patch size (14 included), weights from a file fingerprinted."""

import pytest
import timm
import torch

from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.errors import ConfigError


def test_features_are_timms_own_intermediates_of_the_chosen_block():
    spec = resolve_spec("timm:test_vit", "none", grid=5, layer=2, seed=3)
    assert (spec.family, spec.arch, spec.image_size, spec.layer, spec.weights_id) == (
        "timm",
        "VisionTransformer",
        80,
        2,
        "none:seed=3",
    )
    enc = load_encoder(spec)
    torch.manual_seed(3)
    ref = timm.create_model("test_vit", num_classes=0, img_size=80).eval()
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (want,) = ref.forward_intermediates(x, indices=[2], output_fmt="NLC", intermediates_only=True)
    f = enc(x)
    assert f.shape == (2, 25, ref.num_features) and want.shape == f.shape  # the class token dropped
    assert torch.equal(f, want)
    other = load_encoder(resolve_spec("timm:test_vit", "none", grid=5, layer=-1, seed=3))(x)
    assert not torch.allclose(other, f)


def test_patch_14_models_derive_their_input_size_and_refuse_a_mismatch():
    spec = resolve_spec("timm:vit_small_patch14_dinov2.lvd142m", "none", grid=16)
    assert spec.image_size == 224 and spec.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError, match="patch size 14, so the grid needs --image-size 224"):
        resolve_spec("timm:vit_small_patch14_dinov2.lvd142m", "none", grid=16, image_size=256)
    with pytest.raises(ConfigError, match="unknown timm model"):
        resolve_spec("timm:no_such_vit", "none", grid=4)
    with pytest.raises(ConfigError, match="not a ViT-style timm model"):
        resolve_spec("timm:test_resnet", "none", grid=4)
    with pytest.raises(ConfigError, match="has 6 blocks"):
        resolve_spec("timm:test_vit", "none", grid=4, layer=6)
    # the hub tag names the weights a download would fetch (nothing is downloaded to resolve it)
    assert resolve_spec("timm:vit_small_patch14_dinov2.lvd142m", "hub", grid=16).weights_id == (
        "timm:vit_small_patch14_dinov2.lvd142m"
    )


def test_local_weights_are_loaded_and_fingerprinted(tmp_path):
    torch.manual_seed(11)
    model = timm.create_model("test_vit", num_classes=0)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    spec = resolve_spec("timm:test_vit", str(tmp_path / "w.pth"), grid=10)
    assert spec.weights_id.startswith("sha256:")
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        (want,) = model.eval().forward_intermediates(
            x, indices=[5], output_fmt="NLC", intermediates_only=True
        )
    assert torch.allclose(load_encoder(spec)(x), want, atol=1e-6)
    torch.save({"other": torch.zeros(1)}, tmp_path / "w.pth")  # the file changed since the spec was made
    with pytest.raises(ConfigError, match="differ from the recorded"):
        load_encoder(spec)
