"""Code models (tokenkit/quantizer.py, encoders/vqkd.py, encoders/dalle.py): converted from checkpoints in
the reference key layouts (built here), their ids equal the reference computation, pickles only on trust,
and a store tokenized with them round-trips like any other."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from dall_e import Encoder as DalleRef
from dall_e import map_pixels
from safetensors.torch import save_file
from torch import nn

from cli.tokenkit import main
from tokenkit.codebook import read_header
from tokenkit.errors import ConfigError
from tokenkit.quantizer import convert
from tokenkit.store import TokenStore, verify
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.tokenizer import QuantizerTokenizer, load_tokenizer
from tokenkit.views import ViewConfig, to_unit

K = 64


def vqkd_reference(seed: int = 0):
    """A small VQ-KD in BEiT v2's layout: timm's Beit (the same ViT: q / v biases, mean-pooling fc_norm) as the
    encoder, the task layer, an L2-normalised codebook, and what the tokenizer does not need (decoder, EMA
    statistics, teacher) as the released checkpoint carries it."""
    torch.manual_seed(seed)
    encoder = timm.models.beit.Beit(
        img_size=64,
        patch_size=16,
        embed_dim=128,
        depth=2,
        num_heads=2,
        num_classes=0,
        init_values=None,
        use_abs_pos_emb=True,
        use_rel_pos_bias=False,
    ).eval()
    task = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 32))
    codes = F.normalize(torch.randn(K, 32), dim=-1)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"encode_task_layer.{k}": v for k, v in task.state_dict().items()}
    state |= {
        "quantize.embedding.weight": codes,
        "quantize.embedding.cluster_size": torch.ones(K),
        "quantize.embedding.embed_avg": codes.clone(),
        "quantize.embedding.initted": torch.tensor([1.0]),
        "quantize.cluster_size": torch.ones(K),
        "decoder.pos_embed": torch.randn(1, 17, 128),
        "decode_task_layer.0.weight": torch.randn(128, 128),
        "teacher_model.visual.proj": torch.randn(768, 512),
        "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
    }

    def ids(unit: torch.Tensor) -> torch.Tensor:  # BEiT v2's get_codebook_indices, step by step
        x = unit * 255.0 / 127.5 - 1.0
        with torch.no_grad():
            h = encoder.fc_norm(encoder.forward_features(x)[:, 1:])
            z = F.normalize(task(h), dim=-1).reshape(-1, 32)
            d = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", z, codes)
        return d.argmin(1).view(len(x), -1)

    return state, ids


def test_vqkd_converts_from_beit_v2_layout_and_gives_its_codes(tmp_path):
    state, ref_ids = vqkd_reference()
    torch.save({"model": state}, tmp_path / "vqkd.pth")
    q = convert("vqkd", tmp_path / "vqkd.pth", tmp_path / "vqkd.safetensors")
    assert (q.k, q.grid, q.image_size, q.cfg.depth, q.cfg.heads, q.cfg.code_dim) == (K, 4, 64, 2, 2, 32)
    assert not any(k.startswith(("decoder", "decode_task", "teacher", "scaling")) for k in q.weights)
    assert "quantize.embedding.cluster_size" not in q.weights
    tok = load_tokenizer(tmp_path / "vqkd.safetensors", device="cpu")
    assert isinstance(tok, QuantizerTokenizer) and tok.identity["family"] == "vqkd"
    pixels = torch.randint(
        0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    ids = tok(pixels)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.int64
    assert torch.equal(ids.view(3, -1), ref_ids(to_unit(pixels)))
    assert len(set(ids.flatten().tolist())) > 4  # the codes vary with the pixels
    assert torch.equal(load_tokenizer(tmp_path / "vqkd.safetensors", device="cpu")(pixels), ids)
    # another checkpoint is another tokenizer
    other, _ = vqkd_reference(seed=1)
    torch.save(other, tmp_path / "other.pth")  # a plain state dict is read too
    convert("vqkd", tmp_path / "other.pth", tmp_path / "other.safetensors")
    assert load_tokenizer(tmp_path / "other.safetensors").id != tok.id


def test_dalle_converts_only_a_trusted_pickle_and_gives_the_packages_codes(tmp_path):
    torch.manual_seed(0)
    ref = DalleRef(n_hid=64, n_blk_per_group=1, vocab_size=512).eval()
    torch.save(ref, tmp_path / "encoder.pkl")  # as OpenAI released it: a pickled module
    with pytest.raises(ConfigError, match="pass --trust-pickle if you trust its source"):
        convert("dalle", tmp_path / "encoder.pkl", tmp_path / "dalle.safetensors")
    assert not (tmp_path / "dalle.safetensors").exists()
    q = convert("dalle", tmp_path / "encoder.pkl", tmp_path / "dalle.safetensors", trust_pickle=True)
    assert (q.k, q.image_size, q.grid, q.interpolation) == (512, 112, 14, "lanczos")
    tok = load_tokenizer(tmp_path / "dalle.safetensors")
    pixels = torch.randint(
        0, 256, (2, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        want = ref(map_pixels(to_unit(pixels))).argmax(1)  # (B, 14, 14)
    assert torch.equal(tok(pixels), want)
    # the package's encoder's state dict, saved plainly, needs no trust
    torch.save(ref.state_dict(), tmp_path / "encoder_state.pt")
    q2 = convert("dalle", tmp_path / "encoder_state.pt", tmp_path / "d2.safetensors", image_size=224)
    assert q2.grid == 28 and q2.sha256 == q.sha256


def test_bad_checkpoints_are_one_line(tmp_path, capsys):
    state, _ = vqkd_reference()
    del state["encoder.blocks.1.mlp.fc2.weight"]
    torch.save(state, tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "other.pth")
    for argv, msg in (
        (
            ["convert", "vqkd", tmp_path / "cut.pth", tmp_path / "o.safetensors"],
            "tensors do not form a vqkd model",
        ),
        (["convert", "vqkd", tmp_path / "junk.pth", tmp_path / "o.safetensors"], "not a readable checkpoint"),
        (["convert", "dalle", tmp_path / "other.pth", tmp_path / "o.safetensors"], "no 'blocks.input.w'"),
        (["convert", "vqkd", tmp_path / "other.pth", tmp_path], "is a folder"),
    ):
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.safetensors").exists()
    # a quantizer file whose weights were altered after conversion is refused by its checksum
    state, _ = vqkd_reference()
    torch.save(state, tmp_path / "v.pth")
    q = convert("vqkd", tmp_path / "v.pth", tmp_path / "v.safetensors")
    q.weights["quantize.embedding.weight"][0, 0] += 1
    header = read_header(tmp_path / "v.safetensors")
    save_file(q.weights, tmp_path / "v.safetensors", metadata={"tokenkit": json.dumps(header)})
    rc = main(["inspect", str(tmp_path / "v.safetensors")])
    assert rc == 2 and "weights sha256 does not match" in capsys.readouterr().err


def test_a_store_of_a_code_model_round_trips(tmp_path, photos, capsys):
    torch.manual_seed(0)
    torch.save(DalleRef(n_hid=64, n_blk_per_group=1, vocab_size=512).state_dict(), tmp_path / "enc.pt")
    convert("dalle", tmp_path / "enc.pt", tmp_path / "dalle.safetensors")
    cfg = TokenizeConfig(
        views=ViewConfig(views=2, mode="random", seed=0), format="both", shard_size=5, workers=0
    )
    tokenize(photos, tmp_path / "dalle.safetensors", tmp_path / "tok", cfg, progress=False)
    assert verify(tmp_path / "tok") == []
    store = TokenStore.open(tmp_path / "tok")
    assert (store.k, store.grid, store.manifest["tokenizer"]["family"]) == (512, 14, "dalle")
    tok = load_tokenizer(store.tokenizer_path)
    assert tok.id == store.tokenizer_id
    for pos in (0, 7):
        s = store.read([pos])
        for v, view in enumerate(s["views"][0]):  # re-tokenizing a stored view gives its stored tokens
            assert np.array_equal(tok.encode_image(store.image(pos), view).numpy(), s["tokens"][0, v])
    assert main(["inspect", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "dalle quantizer, 112 px" in out and "K=512" in out
    assert main(["inspect", str(tmp_path / "dalle.safetensors")]) == 0
    assert "grid 14x14 from 112-px views (lanczos)" in capsys.readouterr().out
    assert len(store) == 12
