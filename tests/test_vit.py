"""The block's memory savers are exact and keep what they claim: GELU recomputed in backward, one bf16 copy
of the LayerNorm output, LayerScale folded into the output projections.

The reference is the block written out plainly (as timm / BEiT write it) with the same parameters."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.vit import Block, LayerScale, Mlp, ViTConfig

CFG = ViTConfig(image_size=32, patch_size=16, dim=16, depth=1, heads=2, drop_path=0.0, layer_scale=0.3)


def plain_block(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """x + g1 * proj(attention(norm1 x)) + g2 * fc2(gelu(fc1(norm2 .))), nothing folded or recomputed."""
    a = blk.attn
    B, N, D = x.shape
    y = blk.norm1(x)
    q = a.q(y).view(B, N, a.heads, a.dh).transpose(1, 2)
    k, v = a.kv(y).view(B, N, 2, a.heads, a.dh).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    x = x + blk.ls1.gamma * a.proj(o)
    return x + blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))


def assert_same_values_and_grads(got_fn, want_fn, wrt, grad_rtol: float) -> None:
    """fp64: equal outputs, and equal gradients of their sum of squares with respect to `wrt`."""
    want, got = want_fn(), got_fn()
    gw = torch.autograd.grad(want.square().sum(), wrt)
    gg = torch.autograd.grad(got.square().sum(), wrt)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=1e-14)


def per_sample_saved_bytes(forward, blk: Block) -> int:
    """Bytes autograd keeps for backward per sample under bf16 autocast: the difference between batch 4 and
    batch 2 (parameter-sized tensors, such as bf16 copies of weights, cancel), halved."""
    sizes = []
    for B in (2, 4):
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            return t

        x = torch.randn(B, 5, CFG.dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                forward(blk, x)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) // 2


def test_mlp_equals_gamma_times_linear_gelu_linear_in_fp64():
    torch.manual_seed(0)
    m, ls = Mlp(8, 32).double(), LayerScale(8, 0.5).double()
    with torch.no_grad():
        ls.gamma.uniform_()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert_same_values_and_grads(
        lambda: m(x, ls), lambda: ls.gamma * m.fc2(F.gelu(m.fc1(x))), [x, ls.gamma, *m.parameters()], 1e-12
    )


def test_block_equals_the_plain_block_in_fp64():
    torch.manual_seed(1)
    blk = Block(CFG, 0.0).double()
    x = torch.randn(2, 5, CFG.dim, dtype=torch.float64, requires_grad=True)
    assert_same_values_and_grads(lambda: blk(x), lambda: plain_block(blk, x), [x, *blk.parameters()], 1e-11)


def test_block_under_bf16_autocast_matches_the_plain_block_with_fp32_grads():
    torch.manual_seed(2)
    blk = Block(CFG, 0.0)
    x = torch.randn(4, 5, CFG.dim)
    outs, grads = [], []
    for f in (plain_block, Block.forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(blk, x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.float().square().sum(), list(blk.parameters())))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads[1], grads[0], strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 2e-2 * b.norm()  # bf16 rounding, relative to the gradient's size


def test_block_keeps_seven_fewer_bf16_rows_of_width_d_per_token_than_the_plain_block():
    """Per token, the plain block also keeps: the GELU output (4D, bf16), a second bf16 copy of the first
    LayerNorm's output (D: q and kv cast it separately), and the attention and MLP branch outputs that the
    LayerScale products keep for gamma's gradient (D each). 7 D bf16 values = 14 D bytes per token."""
    blk = Block(CFG, 0.0)
    plain = per_sample_saved_bytes(plain_block, blk)
    ours = per_sample_saved_bytes(Block.forward, blk)
    assert plain - ours == 7 * CFG.dim * 2 * 5, (plain, ours)


def test_position_embeddings_resample_like_timm_and_keep_the_rest():
    """A checkpoint used at another input size: positions resampled as timm does, every other weight kept,
    and the same size is the identity."""
    from pretrain.vit import VisionTransformer, at_image_size, resize_pos_embed

    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(image_size=64, patch_size=16, dim=32, depth=1, heads=2)).eval()
    assert at_image_size(enc, 64) is enc
    for size in (96, 32):  # up and down
        big = at_image_size(enc, size)
        want = timm_layers.resample_abs_pos_embed(
            enc.pos_embed.detach(), [size // 16] * 2, num_prefix_tokens=1
        )
        torch.testing.assert_close(big.pos_embed.detach(), want, rtol=1e-6, atol=1e-6)
        assert big.cfg.grid == size // 16 and torch.equal(big.patch_embed.weight, enc.patch_embed.weight)
        assert big.forward_features(torch.randn(1, 3, size, size)).shape == (1, 1 + (size // 16) ** 2, 32)
    assert torch.equal(resize_pos_embed(enc.pos_embed, 4), enc.pos_embed)
