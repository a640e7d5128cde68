"""The block's memory savers are exact: GELU recomputed in backward, one bf16 copy of the LayerNorm output."""

import torch
from torch import nn

from pretrain.vit import Block, ViTConfig, mlp


def test_gelu_recompute_equals_gelu_then_linear_in_fp64():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    want = seq(x)
    gw = torch.autograd.grad(want.square().sum(), [x, *seq.parameters()])
    got = mlp(seq, x)
    gg = torch.autograd.grad(got.square().sum(), [x, *seq.parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_gelu_recompute_under_bf16_autocast_matches_and_keeps_fp32_grads():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(4, 16)
    outs, grads = [], []
    for f in (seq, lambda t: mlp(seq, t)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.float().square().sum(), list(seq.parameters())))
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0], strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_block_saves_the_hidden_activation_once_and_one_bf16_copy_of_its_input():
    """Under bf16 autocast a block keeps one (N, 4D) tensor (the GELU input) and no two bf16 (N, D)
    tensors holding the same LayerNorm output."""
    cfg = ViTConfig(image_size=32, patch_size=16, dim=16, depth=1, heads=2, drop_path=0.0)
    blk = Block(cfg, 0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            blk(x)
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}
    hidden = {t.untyped_storage().data_ptr() for t in saved if t.numel() == 2 * 5 * 64}
    assert len(hidden - params) == 1
    ln1 = blk.norm1(x).to(torch.bfloat16)
    same = {
        t.untyped_storage().data_ptr()
        for t in saved
        if t.dtype == torch.bfloat16 and t.numel() == ln1.numel() and torch.equal(t.reshape(ln1.shape), ln1)
    }
    assert len(same - params) == 1
