"""The official MaPeT implementation's training step (aimagelab/MaPeT), for bench/mapet_step.py --official
and bench/saved_activations.py --official.

This project ships none of the official code: `repo` points at a checkout of it, and its models need timm
0.6.x importable (0.6.11 per its requirements; 0.6.13 is the first 0.6 release that imports on Python >= 3.11).
The step is the official one from its engine.py: the data loader's per-sample masks
(utils.models.attention_mask_full_mapet_1, float32, one per sample and head) are built on the CPU by
`loader_batch` (the data loader's work), then `step_loss` moves them to the device and runs the forward,
the official output re-indexing and cross-entropy; the caller does backward, clipping and AdamW
(bench/step_timing.py, as for this project's models). Model settings follow its pre-training config:
layer scale 0.1, drop path 0.1, 50 context tokens, K 8192.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_code import import_reference


class Official:
    """The official model of one size and its training-step pieces (imported from a checkout at `repo`)."""

    def __init__(self, repo: str, size: str, batch: int, device: torch.device):
        official, models = import_reference(
            repo, ["models.mapet.mapet", "utils.models"], "the official MaPeT code", "--official"
        )
        self.masks_for = models.attention_mask_full_mapet_1
        self.device, self.B = device, batch
        torch.manual_seed(0)
        self.model = getattr(official, f"mapet_{size}_patch16_224")(
            least_number=50, init_values=0.1, drop_path_rate=0.1
        ).to(device)
        self.model.train()
        self.heads, self.N = self.model.num_heads, self.model.embed_len
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, 224, 224, generator=g).to(device)
        self.tokens = torch.randint(0, 8192, (batch, self.N - 1), generator=g)

    def optimizer(self) -> torch.optim.Optimizer:
        named = list(self.model.named_parameters())
        decays = [p.ndim > 1 and "token" not in n and "pos_embed" not in n for n, p in named]
        groups = [
            {"params": [p for (_, p), d in zip(named, decays, strict=True) if d], "weight_decay": 0.05},
            {"params": [p for (_, p), d in zip(named, decays, strict=True) if not d], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=1e-4)

    def loader_batch(self):
        """What the official data loader yields for one batch (its collate of per-sample masks)."""
        B, N = self.B, self.N
        per = []
        for _ in range(B):
            perm = torch.cat([torch.ones(1), torch.randperm(N - 1) + 2])
            per.append(self.masks_for(perm, self.heads, 50, N))
        mask_q, mask_h, index, upper = (torch.stack(t) for t in zip(*per, strict=True))
        target = self.tokens[(index * upper)[:, 1:]].reshape(B, -1).long()
        return mask_q.float(), mask_h.float(), index, upper, target

    def step_loss(self, batch):
        """engine.py's step: masks and targets to the device, forward, its output re-indexing, loss."""
        mask_q, mask_h, index, upper, target = batch
        dev, B = self.device, self.B
        mask_q, mask_h, target = mask_q.to(dev), mask_h.to(dev), target.to(dev)
        out = self.model(self.images, mask_q, mask_h, index)  # (B, K, P)
        out = (
            out.permute(1, 0, 2)[:, upper[index].reshape(B, -1)].reshape(out.shape[1], B, -1).permute(1, 0, 2)
        )
        return F.cross_entropy(out, target)
