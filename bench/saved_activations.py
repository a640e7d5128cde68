"""Bytes kept for backward per sample by one MaPeT / BEiT forward under bf16 autocast (no GPU needed).

    python bench/saved_activations.py [--size base] [--batch 2] [--official REPO]   (REPO: timm 0.6 on PYTHONPATH)

Counts the distinct storages that autograd saves (torch.autograd.graph.saved_tensors_hooks), parameters
excluded: a device-independent proxy for the activation part of peak training memory. The CPU's attention
kernels save a little more than CUDA's, so compare like with like (before / after a change, or against the
official implementation measured the same way with --official, see bench/official_step.py).
"""

from __future__ import annotations

import argparse

import torch

from pretrain.beit import BEiT, default_num_masked
from pretrain.mapet import MaPeT, random_orders
from pretrain.vit import PRESETS, ViTConfig


def saved_mib_per_sample(model, forward, batch: int) -> float:
    """MiB per sample that forward() (under bf16 autocast) keeps for backward, model's parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20 / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--official", metavar="REPO", help="also the official implementation (timm 0.6 on the path)"
    )
    args = ap.parse_args()
    cfg = ViTConfig(**PRESETS[f"mapet_{args.size}"])
    torch.manual_seed(0)
    B, n = args.batch, cfg.num_patches
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(B, 3, cfg.image_size, cfg.image_size), torch.randint(0, 8192, (B, n))
    masked = torch.zeros(B, n, dtype=torch.bool)
    masked[:, : default_num_masked(n)] = True
    orders = random_orders(B, n, g)
    m, b = MaPeT(cfg, 8192), BEiT(cfg, 8192)
    mapet = saved_mib_per_sample(m, lambda: m.loss(images, targets, orders), B)
    beit = saved_mib_per_sample(b, lambda: b.loss(images, targets, masked), B)
    print(f"ViT-{args.size[0].upper()}, bf16 autocast: saved for backward per sample: MaPeT {mapet:.1f} MiB, "
          f"BEiT {beit:.1f} MiB, MaPeT / BEiT {mapet / beit:.2f}")  # fmt: skip
    if args.official:
        from official_step import Official

        off = Official(args.official, args.size, B, torch.device("cpu"))
        batch = off.loader_batch()
        theirs = saved_mib_per_sample(off.model, lambda: off.step_loss(batch), B)
        print(f"  official MaPeT {theirs:.1f} MiB -> MaPeT / official {mapet / theirs:.2f}")


if __name__ == "__main__":
    main()
