"""MaPeT's fast formulation against the dense per-sample reference; leak and position tests; BEiT masking."""

import numpy as np
import torch

from pretrain.beit import BEiT, block_mask, default_num_masked
from pretrain.data import random_orders
from pretrain.mapet import MaPeT, default_context, visibility_mask
from pretrain.vit import ViTConfig
from tests.mapet_reference import per_sample_mask, reference_logits

CFG = ViTConfig(image_size=64, patch_size=16, dim=48, depth=2, heads=3, drop_path=0.0)  # 4x4 grid, N = 17


def make(seed=0, c=6, k=11):
    torch.manual_seed(seed)
    model = MaPeT(CFG, vocab_size=k, num_context=c).double()
    with torch.no_grad():  # LayerScale 0.1 hides mixing; make every path count for the comparison
        for blk in model.encoder.blocks:
            blk.ls1.gamma.fill_(1.0)
            blk.ls2.gamma.fill_(1.0)
    return model


def test_paper_geometry():
    assert default_context(196) == 50  # CLS + 49 context patches, 147 predicted (75%)
    m = visibility_mask(50, 147)
    assert m.shape == (197 + 2 * 147, 197 + 147) == (491, 344)


def test_static_mask_is_the_per_sample_mask_in_factorisation_order():
    g = torch.Generator().manual_seed(0)
    n, c, P = 17, 6, 11
    for order in random_orders(5, 16, g):
        dense = per_sample_mask(order, c)  # original order: [tokens (n); mask tokens (P); queries (P)]
        tokens = torch.cat(
            [torch.zeros(1, dtype=torch.long), 1 + order]
        )  # original index of each ordered token
        mask_tokens = torch.arange(n, n + P)
        # fast layout: context | mask tokens | targets | queries, keys: context | mask tokens | targets
        rows = torch.cat([tokens[:c], mask_tokens, tokens[c:], torch.arange(n + P, n + 2 * P)])
        cols = torch.cat([tokens[:c], mask_tokens, tokens[c:]])
        assert torch.equal(dense[rows][:, cols], visibility_mask(c, P))


def test_fast_path_matches_dense_reference_logits_and_gradients():
    model = make()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 16), generator=g)
    orders = random_orders(3, 16, g)
    fast, y = model(images, targets, orders)
    ref = reference_logits(model, images, orders)
    assert fast.shape == (3, 11, 11)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(y, targets.gather(1, orders[:, 5:]))
    params = [p for p in model.parameters() if p.requires_grad]
    gf = torch.autograd.grad(torch.nn.functional.cross_entropy(fast.flatten(0, 1), y.flatten()), params)
    gr = torch.autograd.grad(torch.nn.functional.cross_entropy(ref.flatten(0, 1), y.flatten()), params)
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fp32_sdpa_matches_reference_tightly():
    model = make().float()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=g)
    orders = random_orders(2, 16, g)
    fast, _ = model(images, torch.zeros(2, 16, dtype=torch.long), orders)
    torch.testing.assert_close(fast, reference_logits(model, images, orders), rtol=1e-4, atol=1e-5)


def test_both_streams_share_each_samples_drop_path_draw():
    """In training, stochastic depth drops or keeps a block's branch for a whole sample: its content and query
    rows alike (one draw per sample, as the official code's DropPath on the joint tensor). The fast path in
    train mode equals the dense reference given the draws it made, applied per sample to both streams."""
    model = make().train()
    B, rates = 6, (0.4, 0.6)
    for blk, r in zip(model.encoder.blocks, rates, strict=True):
        blk.drop_path = r
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, 3, 64, 64, generator=g, dtype=torch.float64)
    orders = random_orders(B, 16, g)
    torch.manual_seed(7)
    fast, _ = model(images, torch.zeros(B, 16, dtype=torch.long), orders)
    torch.manual_seed(7)  # the same draws, in the fast path's order: per block, attention then MLP branch
    scales = torch.stack(
        [
            torch.stack([torch.empty(B, dtype=torch.float64).bernoulli_(1 - r) / (1 - r) for _ in range(2)])
            for r in rates
        ]
    )  # (depth, 2, B)
    assert 0 < (scales == 0).sum() < scales.numel()  # some branches dropped, some kept
    torch.testing.assert_close(fast, reference_logits(model, images, orders, scales), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # without the draws, the same model gives other logits: the draws took effect
        assert not torch.allclose(fast, reference_logits(model, images, orders))


def patch_grad_norms(model, images, orders, t):
    """|d logits[0, t] / d pixels| summed over each 16x16 patch: (16,) per grid patch."""
    images = images.clone().requires_grad_(True)
    logits, _ = model(images, torch.zeros(1, 16, dtype=torch.long), orders)
    (gi,) = torch.autograd.grad(logits[0, t].sum(), images)
    return gi.abs().reshape(3, 4, 16, 4, 16).sum(dim=(0, 2, 4)).flatten()  # (16,) row-major grid


def test_prediction_depends_only_on_patches_before_it_in_the_order():
    model = make(seed=3)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)
    orders = random_orders(1, 16, g)
    c = model.num_context
    for t in (0, 4, 10):
        grad = patch_grad_norms(model, images, orders, t)
        visible = orders[0, : c - 1 + t]  # context patches and targets before t
        hidden = orders[0, c - 1 + t :]  # target t itself and every later target
        assert (grad[visible] > 1e-8).all(), (t, grad[visible])
        assert (grad[hidden] == 0).all(), (t, grad[hidden])


def test_perturbing_later_targets_leaves_earlier_predictions_unchanged():
    model = make(seed=5)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)
    orders = random_orders(1, 16, g)
    base, _ = model(images, torch.zeros(1, 16, dtype=torch.long), orders)
    t = 7
    patch = int(orders[0, model.num_context - 1 + t])  # the patch of target t
    r, col = divmod(patch, 4)
    poked = images.clone()
    poked[..., r * 16 : (r + 1) * 16, col * 16 : (col + 1) * 16] += 3.0
    after, _ = model(poked, torch.zeros(1, 16, dtype=torch.long), orders)
    assert torch.equal(after[0, : t + 1], base[0, : t + 1])  # up to and including t: unchanged
    assert not torch.allclose(after[0, t + 1 :], base[0, t + 1 :])  # later predictions see it


def test_every_prediction_sees_the_positions_of_all_tokens():
    model = make(seed=7)
    g = torch.Generator().manual_seed(8)
    images = torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)
    orders = random_orders(1, 16, g)
    for t in (0, 5, 10):
        logits, _ = model(images, torch.zeros(1, 16, dtype=torch.long), orders)
        (gp,) = torch.autograd.grad(logits[0, t].sum(), model.encoder.pos_embed)
        assert (gp[0].abs().sum(-1) > 0).all()  # all N = 17 positions, later targets included


def test_loss_is_finite_and_accuracy_in_range():
    model = make().float()
    loss, acc = model.loss(
        torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 16)), random_orders(2, 16, torch.Generator())
    )
    loss, acc = float(loss.detach()), float(acc)
    assert np.isfinite(loss) and abs(loss - np.log(11)) < 2.0 and 0 <= acc <= 1


def test_beit_block_masking_statistics():
    rng = np.random.default_rng(0)
    assert default_num_masked(196) == 75
    masks = np.stack([block_mask(rng, 14, 75) for _ in range(400)])
    counts = masks.sum((1, 2))
    assert counts.max() <= 75 and counts.mean() > 70
    # blockwise: a masked patch has far more masked 4-neighbours than under uniform masking (~38%)
    m = masks.astype(int)
    nb = np.zeros_like(m)
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[:, :, 1:] += m[:, :, :-1]
    nb[:, :, :-1] += m[:, :, 1:]
    deg = np.zeros_like(m)
    one = np.ones_like(m)
    deg[:, 1:] += one[:, :-1]
    deg[:, :-1] += one[:, 1:]
    deg[:, :, 1:] += one[:, :, :-1]
    deg[:, :, :-1] += one[:, :, 1:]
    frac = (nb[m == 1] / deg[m == 1]).mean()
    assert frac > 0.65
    # every position gets masked sometimes
    assert masks.mean(0).min() > 0.02  # corners least often: blocks must fit inside the grid


def beit_masking_reference(rnd, grid=14, n=75, min_patches=16, min_aspect=0.3) -> np.ndarray:
    """BEiT's masking generator as its paper and code describe it, on Python's random: per rectangle up to 10
    tries of area ~ U(min_patches, budget) (Python's uniform takes the bounds in either order), log-uniform
    aspect, a random position inside the grid, accepted if it masks 1..budget new patches."""
    mask = np.zeros((grid, grid), dtype=bool)

    def one_rectangle(budget: int) -> int:  # patches newly masked, 0 when no try fits
        for _ in range(10):
            area = rnd.uniform(min_patches, budget)
            aspect = np.exp(rnd.uniform(np.log(min_aspect), -np.log(min_aspect)))
            h, w = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if max(h, w) >= grid:
                continue
            y, x = rnd.randint(0, grid - h), rnd.randint(0, grid - w)
            fresh = h * w - int(mask[y : y + h, x : x + w].sum())
            if fresh and fresh <= budget:
                mask[y : y + h, x : x + w] = True
                return fresh
        return 0

    while mask.sum() < n and one_rectangle(n - int(mask.sum())):
        pass
    return mask


def test_beit_masking_has_the_distribution_of_beits_generator():
    """Counts and per-position rates of 3000 masks each match the reference's: in particular BEiT often
    stops short of 75 (its last rectangle's area is drawn between the budget and 16)."""
    import random

    ours = np.stack([block_mask(np.random.default_rng(i), 14, 75) for i in range(3000)])
    rnd = random.Random(0)
    ref = np.stack([beit_masking_reference(rnd) for _ in range(3000)])
    c, r = ours.sum((1, 2)), ref.sum((1, 2))
    assert abs(c.mean() - r.mean()) < 0.15 and abs((c == 75).mean() - (r == 75).mean()) < 0.04
    assert 0.55 < (r == 75).mean() < 0.8  # the reference itself: short masks are common
    assert np.abs(ours.mean(0) - ref.mean(0)).max() < 0.05  # where the masks fall
    for grid in (4, 7):  # smaller grids (tests, the quickstart): the minimum block shrinks with the grid
        n = default_num_masked(grid * grid)
        small = np.stack([block_mask(np.random.default_rng(i), grid, n) for i in range(500)]).sum((1, 2))
        assert small.min() >= 1 and small.max() <= n and small.mean() > 0.8 * n


def test_beit_predicts_only_masked_patches():
    torch.manual_seed(0)
    model = BEiT(CFG, vocab_size=11)
    masked = torch.from_numpy(
        np.stack([block_mask(np.random.default_rng(i), 4, 6, min_block=2) for i in range(2)])
    )
    targets = torch.randint(0, 11, (2, 16))
    logits, y = model(torch.randn(2, 3, 64, 64), targets, masked.flatten(1))
    assert logits.shape == (int(masked.sum()), 11) and torch.equal(y, targets[masked.flatten(1)])


def test_flex_attention_matches_sdpa_on_cpu():
    """The CUDA path's BlockMask logic, checked on CPU (compiled FlexAttention, forward only: its CPU
    backward is not implemented)."""
    model = make().float()
    g = torch.Generator().manual_seed(9)
    images, orders = torch.randn(2, 3, 64, 64, generator=g), random_orders(2, 16, g)
    t = torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        model.attention.backend = "sdpa"
        ref, _ = model(images, t, orders)
        model.attention.backend = "flex"
        out, _ = model(images, t, orders)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_auto_backend_runs_sdpa_inside_a_compiled_step_and_an_explicit_flex_is_kept(monkeypatch):
    """ "auto" inside torch.compile is SDPA's boolean masks, on CUDA too (traced FlexAttention trained away from
    eager on an H100; eager CUDA calls keep FlexAttention: tests/test_cuda.py), and on the CPU; an explicit
    "flex" inside a compiled step is the plain flex_attention with BlockMasks, for Dynamo to trace."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    model = make().float()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for device in (torch.device("cuda", 0), torch.device("cpu")):  # nothing is built on the (absent) GPU
        masks, flex = model.attention_args(device)
        assert flex is None and masks[0] is model.mask_b
        assert torch.equal(masks[1], model.mask_b[model.num_predict :])
    model.attention.backend = "flex"
    masks, flex = model.attention_args(torch.device("cpu"))
    assert flex is flex_attention and all(isinstance(m, BlockMask) for m in masks)
