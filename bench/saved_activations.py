"""Bytes kept for backward per sample by one MaPeT / BEiT forward under bf16 autocast (no GPU needed).

    python bench/saved_activations.py [--size base] [--official REPO]   (REPO: timm 0.6 on PYTHONPATH)

Counts the distinct storages that autograd saves (torch.autograd.graph.saved_tensors_hooks) at batch 2 and
batch 4; the difference, per sample, is what grows with the batch (parameter-sized tensors such as bf16
copies of the weights cancel): a device-independent proxy for the activation part of peak training
memory. The CPU's attention kernels save a little more than CUDA's, so compare like with like (before /
after a change, or the official implementation measured the same way with --official).
"""

from __future__ import annotations

import argparse

import torch

from pretrain.beit import BEiT, default_num_masked
from pretrain.data import random_orders
from pretrain.mapet import MaPeT
from pretrain.vit import PRESETS, ViTConfig


def saved_bytes(forward) -> int:
    """Bytes of the distinct storages that forward() (under bf16 autocast) keeps for backward."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forward()
    return sum(seen.values())


def saved_mib_per_sample(make_forward) -> float:
    """MiB per sample kept for backward: make_forward(batch) -> forward; measured at batch 2 and 4."""
    small, large = (saved_bytes(make_forward(b)) for b in (2, 4))
    return (large - small) / 2 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    ap.add_argument(
        "--official", metavar="REPO", help="also the official implementation (timm 0.6 on the path)"
    )
    args = ap.parse_args()
    cfg = ViTConfig(**PRESETS[f"mapet_{args.size}"])
    torch.manual_seed(0)
    n = cfg.num_patches
    m, b = MaPeT(cfg, 8192), BEiT(cfg, 8192)

    def inputs(B):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
        return images, torch.randint(0, 8192, (B, n), generator=g), g

    def mapet(B):
        images, targets, g = inputs(B)
        return lambda: m.loss(images, targets, random_orders(B, n, g))

    def beit(B):
        images, targets, _ = inputs(B)
        masked = torch.zeros(B, n, dtype=torch.bool)
        masked[:, : default_num_masked(n)] = True
        return lambda: b.loss(images, targets, masked)

    ours, theirs = saved_mib_per_sample(mapet), saved_mib_per_sample(beit)
    print(f"ViT-{args.size[0].upper()}, bf16 autocast: saved for backward per sample: MaPeT {ours:.1f} MiB, "
          f"BEiT {theirs:.1f} MiB, MaPeT / BEiT {ours / theirs:.2f}")  # fmt: skip
    if args.official:
        from official_step import Official

        def official(B):
            off = Official(args.official, args.size, B, torch.device("cpu"))
            batch = off.loader_batch()
            return lambda: off.step_loss(batch)

        off = saved_mib_per_sample(official)
        print(f"  official MaPeT {off:.1f} MiB -> MaPeT / official {ours / off:.2f}")


if __name__ == "__main__":
    main()
