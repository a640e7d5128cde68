import pytest
import torch

from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.errors import ConfigError


@pytest.mark.parametrize(
    "model,grid,size,dim", [("tokenkit-tiny-vit", 4, 64, 96), ("tokenkit-tiny-rn", 3, 96, 256)]
)
def test_grid_features_shape_and_determinism(model, grid, size, dim):
    spec = resolve_spec(model, "none", grid=grid, seed=3)
    assert spec.image_size == size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    f1 = load_encoder(spec)(x)
    f2 = load_encoder(spec)(x)  # a second build from the same spec: same seeded weights
    assert f1.shape == (2, grid * grid, dim) and f1.dtype == torch.float32
    assert torch.equal(f1, f2)
    other = load_encoder(resolve_spec(model, "none", grid=grid, seed=4))(x)
    assert not torch.allclose(f1, other)


def test_vit_features_are_patch_tokens_of_the_chosen_block():
    spec = resolve_spec("tokenkit-tiny-vit", "none", grid=4, layer=0)
    enc = load_encoder(spec)
    x = torch.randn(1, 3, 64, 64)
    full = resolve_spec("tokenkit-tiny-vit", "none", grid=4)  # last block (1)
    assert spec.layer == 0 and full.layer == 1
    assert not torch.allclose(enc(x), load_encoder(full)(x))
    # the CLS token is dropped and the grid is row-major: 16 tokens
    assert enc(x).shape == (1, 16, 96)


def test_image_size_and_grid_must_agree():
    with pytest.raises(ConfigError, match="--image-size 100 with --grid 4.*--image-size 64"):
        resolve_spec("tokenkit-tiny-vit", "none", grid=4, image_size=100)
    with pytest.raises(ConfigError, match="RN50x64 has stride 32"):
        resolve_spec("RN50x64", "none", grid=14, image_size=224)
    assert resolve_spec("RN50x64", "none", grid=14, image_size=448).image_size == 448


def test_bad_model_layer_and_checkpoint():
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        resolve_spec("no-such-model", "none")
    with pytest.raises(ConfigError, match="has 2 blocks"):
        resolve_spec("tokenkit-tiny-vit", "none", grid=4, layer=5)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        resolve_spec("tokenkit-tiny-vit", "/nonexistent/clip.pt", grid=4)


def test_local_checkpoint_is_loaded_and_fingerprinted(tmp_path):
    import open_clip

    resolve_spec("tokenkit-tiny-vit", "none", grid=4)  # registers tokenkit's tiny configs with open_clip
    torch.manual_seed(7)
    model = open_clip.create_model("tokenkit-tiny-vit", pretrained=None)
    ckpt = tmp_path / "clip.pt"
    torch.save(model.state_dict(), ckpt)
    spec = resolve_spec("tokenkit-tiny-vit", str(ckpt), grid=4)
    assert spec.weights_id.startswith("sha256:")
    x = torch.randn(1, 3, 64, 64)
    ref = model.visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")
    assert torch.allclose(load_encoder(spec)(x), ref["image_intermediates"][0], atol=1e-6)
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, ckpt)  # the file changed under the spec
    with pytest.raises(ConfigError, match="differ from the recorded"):
        load_encoder(spec)


def test_local_dir_model_folder_is_loaded_with_its_own_config(tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    from tokenkit.encoders.clip import MODEL_CONFIGS

    resolve_spec("tokenkit-tiny-vit", "none", grid=4)  # registers tokenkit's tiny configs with open_clip
    torch.manual_seed(11)
    model = open_clip.create_model("tokenkit-tiny-vit", pretrained=None)
    folder = tmp_path / "my-clip"
    folder.mkdir()
    cfg = json.loads((MODEL_CONFIGS / "tokenkit-tiny-vit.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    # the model name given does not matter: the folder's config decides the architecture
    spec = resolve_spec("ViT-B-16", f"local-dir:{folder}", grid=4)
    assert spec.arch == "vit" and spec.image_size == 64 and spec.weights_id.startswith("sha256:")
    x = torch.randn(1, 3, 64, 64)
    ref = model.visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")
    assert torch.allclose(load_encoder(spec)(x), ref["image_intermediates"][0], atol=1e-6)
    with pytest.raises(ConfigError, match="not a readable open_clip config"):
        resolve_spec("ViT-B-16", f"local-dir:{tmp_path}", grid=4)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no open_clip_model.safetensors"):
        resolve_spec("ViT-B-16", f"local-dir:{folder}", grid=4)


def test_weights_that_cannot_be_loaded_are_one_line_errors(tmp_path):
    # a tag open_clip has no weights for fails before any download is tried
    spec = resolve_spec("tokenkit-tiny-vit", "laion2b_s34b_b79k", grid=4)
    with pytest.raises(ConfigError, match="could not load tokenkit-tiny-vit weights"):
        load_encoder(spec)
    bad = tmp_path / "clip.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not load .*refused by weights-only loading"):
        load_encoder(resolve_spec("tokenkit-tiny-vit", str(bad), grid=4))


def test_features_are_the_trunk_outputs_written_out_by_hand():
    """What the grid features are, computed step by step from the open_clip modules: for a ResNet, the last
    stage's output before attention pooling (the official k-CLIP features); for a ViT, the patch tokens after
    the chosen block, before ln_post, CLS dropped. Guards against open_clip's forward_intermediates changing
    what it returns (a norm applied, the pooled stage, another block)."""
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    rn = load_encoder(resolve_spec("tokenkit-tiny-rn", "none", grid=3))
    v = rn.visual
    with torch.no_grad():
        h = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # (2, C, 3, 3)
    assert torch.allclose(rn(x), h.flatten(2).transpose(1, 2), atol=1e-6)

    x = x[:, :, :64, :64]
    for layer in (0, 1):
        vit = load_encoder(resolve_spec("tokenkit-tiny-vit", "none", grid=4, layer=layer))
        v = vit.visual
        with torch.no_grad():
            t = v.conv1(x).flatten(2).transpose(1, 2)  # (2, 16, D)
            cls = v.class_embedding.expand(2, 1, -1)
            t = v.ln_pre(torch.cat([cls, t], dim=1) + v.positional_embedding)
            for blk in v.transformer.resblocks[: layer + 1]:
                t = blk(t)
        assert torch.allclose(vit(x), t[:, 1:], atol=1e-5), layer
