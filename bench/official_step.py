"""One training step of the official MaPeT implementation (aimagelab/MaPeT), timed like bench/mapet_step.py.

    PYTHONPATH=TIMM_0_6_DIR python bench/official_step.py --repo PATH/TO/aimagelab-MaPeT --size small \
        [--batch 8] [--threads 2] [--device cpu|cuda]

This project ships none of the official code: --repo points at a checkout of it, and its models need timm
0.6.x importable (0.6.11 per its requirements; 0.6.13 is the first 0.6 release that imports on Python >= 3.11,
used here). The step is the official one from its engine.py: the data loader's per-sample masks
(utils.models.attention_mask_full_mapet_1, float32, one per sample and head) are built on the CPU outside
the timed region (their build time is printed separately), moved to the device, then forward, the official
output re-indexing, cross-entropy, backward, gradient clipping at 3.0 and AdamW. Model settings follow its
pre-training config: layer scale 0.1, drop path 0.1, 50 context tokens, K 8192; bf16 autocast on CUDA.

Prints one JSON line: {"size", "device", "precision", "batch", "step_s", "peak_gib", "mask_build_s"}.
bench/mapet_step.py --official runs this in a subprocess and prints the ratios against this project's step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from step_timing import time_train_steps


class Official:
    """The official model of one size and its training-step pieces (imported from a checkout at `repo`)."""

    def __init__(self, repo: str, size: str, batch: int, device: torch.device):
        sys.path.insert(0, repo)
        try:
            import models.mapet.mapet as official
            from utils.models import attention_mask_full_mapet_1
        except Exception as e:  # noqa: BLE001 - any import failure means the same fix
            raise SystemExit(
                f"error: cannot import the official MaPeT code from {repo} ({type(e).__name__}: {e}); "
                "pass a checkout of github.com/aimagelab/MaPeT as --repo and put timm 0.6.x on PYTHONPATH"
            ) from None
        self.masks_for, self.device, self.B = attention_mask_full_mapet_1, device, batch
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="checkout of github.com/aimagelab/MaPeT")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    off = Official(args.repo, args.size, args.batch, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    B, builds = args.batch, []

    def loader_batch():
        t = time.perf_counter()
        batch = off.loader_batch()
        builds.append(time.perf_counter() - t)
        return batch

    step_s, peak = time_train_steps(
        off.step_loss, off.model.parameters(), off.optimizer(), loader_batch, device, args.iters, args.warmup
    )
    print(
        json.dumps(
            {
                "size": args.size,
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"CPU, {args.threads} threads",
                "precision": precision,
                "batch": B,
                "step_s": step_s,
                "peak_gib": peak if device.type == "cuda" else None,
                "mask_build_s": statistics.median(builds),
            }
        )
    )


if __name__ == "__main__":
    main()
