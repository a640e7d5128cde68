"""The BEiT objective in the same model family: blockwise masking, a learned mask token, and prediction of
the masked patches' visual tokens (Bao et al. 2021). The paper's fair baseline (MaPeT Sec. 4.2).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pretrain.token_loss import IGNORE, token_loss
from pretrain.vit import VisionTransformer, ViTConfig, block_draws, run_block


def default_num_masked(num_patches: int) -> int:
    """BEiT masks 75 of 196 patches (~40%); the same fraction on other grids."""
    return round(num_patches * 75 / 196)


def block_mask(
    rng: np.random.Generator,
    grid: int,
    num_masked: int,
    min_block: int | None = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """BEiT's blockwise masking: rectangles of area ~ U(min_block, budget) patches and log-uniform aspect in
    [0.3, 1/0.3], up to 10 tries per rectangle, until num_masked patches are masked (never more) or no try
    fits. Near the end the budget is below min_block and the area is drawn between the two, as BEiT draws
    it, so a mask often stops a few patches short (~1/3 of masks). min_block: BEiT's 16 at 14 x 14, the same
    share of the patches on other grids (a 4 x 4 grid could fit no block of 16). Returns (G, G) bool."""
    if min_block is None:
        min_block = max(1, round(16 * grid * grid / 196))
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    while count < num_masked:
        budget = num_masked - count
        added = 0
        for _ in range(10):
            area = rng.uniform(*sorted((min_block, budget)))
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < grid and 0 < w < grid:
                top, left = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
                region = mask[top : top + h, left : left + w]
                new = int((~region).sum())
                if 0 < new <= budget:
                    region[:] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


class BEiT(nn.Module):
    """num_masked: the most patches a mask holds (block_mask never masks more). The loss runs over exactly
    that many rows per sample, the rows of a mask that stopped short padded and ignored (token_loss's
    IGNORE): the step's shapes never depend on the masks, so it runs without a host sync and compiles
    once."""

    def __init__(self, cfg: ViTConfig, vocab_size: int, num_masked: int | None = None):
        super().__init__()
        self.encoder = VisionTransformer(cfg)
        self.num_masked = num_masked or default_num_masked(cfg.num_patches)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(cfg.dim, vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        masked: torch.Tensor,
        drop: torch.Tensor | None = None,
    ):
        """images (B, 3, S, S), targets (B, G*G) int64, masked (B, G*G) bool, at most num_masked per row;
        drop (B, depth, 2) float drop-path draws, or None (pretrain.vit.add_drop_path).

        Returns the normalised outputs (B, num_masked, D) at each sample's masked patches (in grid order, then
        padding) and their targets (B, num_masked), IGNORE at the padding.
        """
        if masked.device.type == "cpu" and not torch.compiler.is_compiling():  # free to check off the GPU
            most = int(masked.sum(1).max())
            assert most <= self.num_masked, (
                f"a mask holds {most} patches, more than num_masked {self.num_masked}"
            )
        enc = self.encoder
        x = enc.embed_patches(images)  # (B, G*G, D)
        x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)  # masked patches -> mask token
        x = enc.prepend_cls(x)  # (B, N, D)
        for i, blk in enumerate(enc.blocks):
            x = run_block(enc, blk, x, u=block_draws(drop, i))
        x = enc.norm(x)[:, 1:]  # (B, G*G, D)
        # masked patches first, in grid order (stable sort), then as many unmasked ones as pad to num_masked
        pick = masked.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, : self.num_masked]
        y = targets.gather(1, pick).masked_fill(~masked.gather(1, pick), IGNORE)  # (B, num_masked)
        return x.gather(1, pick[..., None].expand(-1, -1, x.shape[-1])), y

    def forward(self, images, targets, masked, drop=None):
        """Logits (M, K) of the batch's M masked patches and their targets (M,)."""
        x, y = self.features(images, targets, masked, drop)
        keep = y != IGNORE
        return self.head(x[keep]), y[keep]

    def loss(self, images, targets, masked, drop=None):
        """Mean cross-entropy over the masked patches and their token top-1 (pretrain.token_loss)."""
        x, y = self.features(images, targets, masked, drop)
        return token_loss(x, self.head, y)
