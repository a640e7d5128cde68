"""Parity with the official MaPeT implementation: the same weights, images, orders and targets through the
official model (aimagelab/MaPeT, its per-sample dense masks) and through ours (gathered order, one static
mask) give the same logits, loss and gradients.

    python bench/official_parity.py --official ~/src/MaPeT --official-pythonpath ~/timm-0.6.13 \
        [--size tiny] [--batch 2] [--dtype float64] [--drop-path 0.1]

Both models run in float64 by default (tolerance 1e-9), without drop path (eval mode) unless --drop-path is
given: then both train with it, seeded alike, and make the same draws (one per sample and residual branch,
shared by the two streams, in block order). The weights are drawn
once and copied from the official model into ours under a name map that covers every parameter on both
sides (the script fails if one is left over). LayerScale is drawn around 1 rather than left at its init 0.1,
so every branch moves the output. The official forward takes the permutation as its data loader makes it
(CLS first, patches 1-based after it) and returns the predicted positions in the image's row-major order;
ours predicts them in the factorisation order, so rows are matched by position before comparing. Prints the
largest differences and exits 1 when one is above the tolerance. Needs the official checkout and timm 0.6
(see bench/official_step.py); this project ships none of the official code.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from reference_code import ALL, Plan, copy_weights, grad_diffs, import_reference, parity_args, rel

from pretrain.mapet import MaPeT
from pretrain.vit import PRESETS, ViTConfig

K = 8192
CONTEXT = 50


def weight_plan(depth: int) -> Plan:
    """Every official parameter and its counterpart in ours (the same shapes: one-to-one)."""
    out = {
        "patch_embed.proj.weight": "encoder.patch_embed.weight",
        "patch_embed.proj.bias": "encoder.patch_embed.bias",
        "cls_token": "encoder.cls_token",
        "pos_embed": "encoder.pos_embed",
        "mask_positional_token": "mask_token",
        "norm.weight": "encoder.norm.weight",
        "norm.bias": "encoder.norm.bias",
        "decoder.weight": "head.weight",
        "decoder.bias": "head.bias",
    }
    per_block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.q": "attn.q",
        "attn.kv": "attn.kv",
        "attn.proj": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(depth):
        for theirs, ours in per_block.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{leaf}"] = f"encoder.blocks.{i}.{ours}.{leaf}"
        out[f"blocks.{i}.ls1.gamma"] = f"encoder.blocks.{i}.ls1.gamma"
        out[f"blocks.{i}.ls2.gamma"] = f"encoder.blocks.{i}.ls2.gamma"
    return [(a, ALL, b, ALL) for a, b in out.items()]


def official_model(repo: str, size: str, dtype: torch.dtype, drop_path: float):
    official, models = import_reference(
        repo, ["models.mapet.mapet", "utils.models"], "the official MaPeT code", "--official"
    )
    masks_for = models.attention_mask_full_mapet_1
    model = getattr(official, f"mapet_{size}_patch16_224")(
        least_number=CONTEXT, init_values=0.1, drop_path_rate=drop_path
    )
    return model.to(dtype).train(drop_path > 0), masks_for


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drop-path", type=float, default=0.0, help="> 0: both in train mode, same draws")
    args = parity_args(ap, "--official", "checkout of aimagelab/MaPeT")
    dtype = args.dtype
    torch.manual_seed(args.seed)
    theirs, masks_for = official_model(args.official, args.size, dtype, args.drop_path)
    with torch.no_grad():  # LayerScale around 1: every branch moves the output
        for name, p in theirs.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(0.5 + torch.rand_like(p))
    cfg = ViTConfig(**PRESETS[f"mapet_{args.size}"], drop_path=args.drop_path)
    ours = MaPeT(cfg, vocab_size=K, num_context=CONTEXT).to(dtype).train(args.drop_path > 0)
    plan = weight_plan(cfg.depth)
    copy_weights(theirs, ours, plan)

    B, G2, N = args.batch, cfg.num_patches, cfg.num_patches + 1
    g = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g, dtype=dtype)
    targets = torch.randint(0, K, (B, G2), generator=g)
    orders = torch.rand(B, G2, generator=g).argsort(dim=1)  # ours: patch indices in factorisation order

    # official: its loader's permutation (CLS = 1, patch j = j + 2), per-sample masks, forward, targets
    per = [
        masks_for(torch.cat([torch.ones(1), o.double() + 2]), theirs.num_heads, CONTEXT, N) for o in orders
    ]
    mask_q, mask_h, index, _upper = (torch.stack(t) for t in zip(*per, strict=True))
    # drop path: one draw per sample and residual branch, in block order, on both sides
    torch.manual_seed(args.seed + 2)
    their_logits = theirs(images, mask_q.to(dtype), mask_h.to(dtype), index).transpose(1, 2)  # (B, P, K)
    their_targets = targets[index[:, 1:]].reshape(B, -1)  # predicted patches in row-major order
    their_loss = F.cross_entropy(their_logits.flatten(0, 1), their_targets.flatten())
    their_loss.backward()

    # ours, rows put in row-major order of the predicted patches to match
    torch.manual_seed(args.seed + 2)
    our_logits, our_targets = ours(images, targets, orders)  # (B, P, K) in factorisation order
    rowmajor = orders[:, CONTEXT - 1 :].argsort(dim=1)  # (B, P)
    our_logits = our_logits.gather(1, rowmajor[..., None].expand(-1, -1, K))
    our_targets = our_targets.gather(1, rowmajor)
    torch.manual_seed(args.seed + 2)
    our_loss, _acc = ours.loss(images, targets, orders)
    our_loss.backward()

    diffs = {
        "targets": float((our_targets != their_targets).sum()),
        "logits": rel(our_logits, their_logits),
        "loss": rel(our_loss, their_loss),
    }
    grads = grad_diffs(theirs, ours, plan)
    worst = max(grads, key=grads.get)
    print(
        f"MaPeT-{args.size[0].upper()} (official) vs ours, {str(dtype)[6:]}, batch {B}, N {N}, c {CONTEXT}, K {K}: "
        f"drop path {args.drop_path}: loss {float(their_loss.detach()):.6f} vs {float(our_loss.detach()):.6f}"
    )
    print(f"  targets differing: {int(diffs['targets'])}")
    print(f"  largest relative difference: logits {diffs['logits']:.2e}, loss {diffs['loss']:.2e}")
    print(f"  gradients of {len(grads)} parameters: largest relative difference {grads[worst]:.2e} ({worst})")
    bad = diffs["targets"] > 0 or max(diffs["logits"], diffs["loss"], grads[worst]) > args.tol
    print(f"  {'MISMATCH' if bad else 'match'} (tolerance {args.tol:g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
