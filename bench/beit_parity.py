"""Parity of the BEiT baseline with BEiT's own code (microsoft/unilm, beit/): the model, and the masks.

    python bench/beit_parity.py --beit ~/src/unilm/beit --beit-pythonpath ~/timm-0.6.13 \
        [--size tiny] [--batch 2] [--masks 20000]

Model: BEiT's VisionTransformerForMaskedImageModeling with absolute positions and LayerScale (the setting
MaPeT's fair comparison uses; no relative position bias), its weights copied into pretrain.beit.BEiT: the same
images, masks and targets give the same logits, loss and gradients (float64, tolerance 1e-9; no drop path,
whose draws the two codes make differently). BEiT's fused qkv linear has no key bias; ours has one (a key
bias adds the same logit to every key of a row, which softmax ignores), so it is set to zero and its gradient
must be zero. Masks: BEiT's MaskingGenerator (75 of 196 patches, blocks of >= 16) and pretrain.beit.block_mask
draw masks from different generators, so their distributions are compared instead: masked-count histogram,
the share of masks that reach 75, and each patch's masking frequency. Prints the differences and exits 1
when one is above its tolerance. Needs the BEiT folder and timm 0.6 (this project ships none of BEiT's code).
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from reference_code import ALL, Plan, copy_weights, grad_diffs, import_reference, parity_args, rel

from pretrain.beit import BEiT, block_mask, default_num_masked
from pretrain.vit import PRESETS, ViTConfig

K = 8192


def import_beit(folder: str):
    """BEiT's modeling_pretrain module and its MaskingGenerator class."""
    if not hasattr(np, "int"):
        np.int = int  # removed in numpy 1.24; BEiT's MaskingGenerator still allocates with it
    pretrain, masking = import_reference(
        folder, ["modeling_pretrain", "masking_generator"], "BEiT's code", "--beit"
    )
    return pretrain, masking.MaskingGenerator


def weight_plan(depth: int, dim: int) -> Plan:
    """Every BEiT parameter and its counterpart in ours (BEiT's fused qkv weight split into our q and kv)."""
    pairs = [
        ("patch_embed.proj.weight", "encoder.patch_embed.weight"),
        ("patch_embed.proj.bias", "encoder.patch_embed.bias"),
        ("cls_token", "encoder.cls_token"),
        ("pos_embed", "encoder.pos_embed"),
        ("mask_token", "mask_token"),
        ("norm.weight", "encoder.norm.weight"),
        ("norm.bias", "encoder.norm.bias"),
        ("lm_head.weight", "head.weight"),
        ("lm_head.bias", "head.bias"),
    ]
    for i in range(depth):
        t, o = f"blocks.{i}.", f"encoder.blocks.{i}."
        for a, b in [
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attn.proj", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            pairs += [(f"{t}{a}.{leaf}", f"{o}{b}.{leaf}") for leaf in ("weight", "bias")]
        pairs += [
            (f"{t}gamma_1", f"{o}ls1.gamma"),
            (f"{t}gamma_2", f"{o}ls2.gamma"),
            (f"{t}attn.q_bias", f"{o}attn.q.bias"),
        ]
    plan = [(a, ALL, b, ALL) for a, b in pairs]
    for i in range(depth):  # fused qkv (3D, D), no key bias -> q (D, D) and kv (2D, D), both with biases
        t, o = f"blocks.{i}.attn.", f"encoder.blocks.{i}.attn."
        plan += [
            (f"{t}qkv.weight", slice(0, dim), f"{o}q.weight", ALL),
            (f"{t}qkv.weight", slice(dim, 3 * dim), f"{o}kv.weight", ALL),
            (f"{t}v_bias", ALL, f"{o}kv.bias", slice(dim, 2 * dim)),
        ]
    return plan


def model_parity(beit, args, gen_cls) -> bool:
    dtype = args.dtype
    torch.manual_seed(args.seed)
    p = PRESETS[f"mapet_{args.size}"]
    theirs = beit.VisionTransformerForMaskedImageModeling(
        img_size=p["image_size"], patch_size=p["patch_size"], embed_dim=p["dim"], depth=p["depth"],
        num_heads=p["heads"], mlp_ratio=4, qkv_bias=True, vocab_size=K, init_values=0.1,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_abs_pos_emb=True,
    ).to(dtype).eval()  # fmt: skip
    with torch.no_grad():  # LayerScale and the q / v biases away from their init: every term counts
        for name, q in theirs.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                q.copy_(0.5 + torch.rand_like(q))
            elif name.endswith(("q_bias", "v_bias")):
                q.copy_(0.1 * torch.randn_like(q))
    cfg = ViTConfig(**p, drop_path=0.0)
    ours = BEiT(cfg, vocab_size=K).to(dtype).eval()
    plan = weight_plan(cfg.depth, cfg.dim)
    copy_weights(theirs, ours, plan)
    with torch.no_grad():
        for blk in ours.encoder.blocks:
            blk.attn.kv.bias[: cfg.dim].zero_()  # BEiT has no key bias

    B, G = args.batch, cfg.grid
    g = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    targets = torch.randint(0, K, (B, G * G), generator=g)
    gen = beit_generator(gen_cls, G, args.seed)
    masked = torch.from_numpy(np.stack([gen() for _ in range(B)])).flatten(1).bool()  # (B, G*G)

    their_logits = theirs(images, masked)  # (M, K), the masked patches in row-major order
    their_loss = F.cross_entropy(their_logits, targets[masked])  # BEiT's engine_for_pretraining
    their_loss.backward()
    our_logits, our_targets = ours(images, targets, masked)
    our_loss, _acc = ours.loss(images, targets, masked)
    our_loss.backward()

    grads = grad_diffs(theirs, ours, plan)
    worst = max(grads, key=grads.get)
    key_bias = max(float(blk.attn.kv.bias.grad[: cfg.dim].abs().max()) for blk in ours.encoder.blocks)
    scale = max(float(q.grad.abs().max()) for q in theirs.parameters())
    same_targets = torch.equal(our_targets, targets[masked])
    diffs = (rel(our_logits, their_logits), rel(our_loss, their_loss))
    print(
        f"BEiT-{args.size[0].upper()} (BEiT's code) vs ours, {str(dtype)[6:]}, batch {B}, "
        f"{int(masked.sum())} masked patches: loss {float(their_loss.detach()):.6f} vs {float(our_loss.detach()):.6f}"
    )
    print(f"  targets in the same order: {same_targets}")
    print(f"  largest relative difference: logits {diffs[0]:.2e}, loss {diffs[1]:.2e}")
    print(f"  gradients of {len(grads)} tensors: largest relative difference {grads[worst]:.2e} ({worst})")
    print(
        f"  our key biases' gradient (none in BEiT): {key_bias:.1e}, {key_bias / scale:.1e} of the largest gradient"
    )
    bad = not same_targets or max(*diffs, grads[worst], key_bias / scale) > args.tol
    print(f"  {'MISMATCH' if bad else 'match'} (tolerance {args.tol:g})")
    return not bad


def beit_generator(gen_cls, grid: int, seed: int):
    """BEiT's MaskingGenerator as its pre-training runs it (~40% of the patches, blocks of >= 16), seeded."""
    random.seed(seed)
    return gen_cls(grid, num_masking_patches=default_num_masked(grid * grid), min_num_patches=16)


def mask_parity(gen_cls, n: int, seed: int) -> bool:
    G, M = 14, default_num_masked(196)
    gen = beit_generator(gen_cls, G, seed)
    theirs = np.stack([gen().astype(bool) for _ in range(n)])  # (n, G, G)
    rng = np.random.default_rng(seed)
    ours = np.stack([block_mask(rng, G, M) for _ in range(n)])
    counts = [m.reshape(n, -1).sum(1) for m in (theirs, ours)]
    cdf = [np.array([(c <= k).mean() for k in range(M + 1)]) for c in counts]
    ks = float(np.abs(cdf[0] - cdf[1]).max())
    freq = [m.mean(0) for m in (theirs, ours)]  # (G, G) masking frequency per patch
    freq_gap = float(np.abs(freq[0] - freq[1]).max())
    # sampling noise: two independent n-sample estimates; KS critical value at alpha 0.001 and ~4.5 sigma
    ks_tol = 1.95 * np.sqrt(2 / n)
    freq_tol = 4.5 * np.sqrt(2 * 0.5 * 0.5 / n)
    full = [float((c == M).mean()) for c in counts]
    print(f"BEiT's MaskingGenerator vs pretrain.beit.block_mask, {n} masks each, {M} of {G * G} patches:")
    print(
        f"  mean masked: {counts[0].mean():.2f} vs {counts[1].mean():.2f}; reaching {M}: {full[0]:.3f} vs {full[1]:.3f}"
    )
    print(f"  count distributions: largest CDF difference {ks:.4f} (tolerance {ks_tol:.4f})")
    print(
        f"  per-patch masking frequency: largest difference {freq_gap:.4f} "
        f"(tolerance {freq_tol:.4f}); corner {freq[0][0, 0]:.3f} vs {freq[1][0, 0]:.3f}, "
        f"centre {freq[0][7, 7]:.3f} vs {freq[1][7, 7]:.3f}"
    )
    bad = ks > ks_tol or freq_gap > freq_tol
    print(f"  {'MISMATCH' if bad else 'match'}")
    return not bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", type=int, default=20000, help="masks drawn from each generator")
    args = parity_args(ap, "--beit", "the beit/ folder of microsoft/unilm")
    beit, gen_cls = import_beit(args.beit)
    ok = model_parity(beit, args, gen_cls)
    ok = mask_parity(gen_cls, args.masks, args.seed) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
