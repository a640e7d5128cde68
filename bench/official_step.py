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
    sys.path.insert(0, args.repo)
    try:
        import models.mapet.mapet as official
        from utils.models import attention_mask_full_mapet_1
    except Exception as e:  # noqa: BLE001 - any import failure means the same fix
        raise SystemExit(
            f"error: cannot import the official MaPeT code from {args.repo} ({type(e).__name__}: {e}); "
            "pass a checkout of github.com/aimagelab/MaPeT as --repo and put timm 0.6.x on PYTHONPATH"
        ) from None

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(official, f"mapet_{args.size}_patch16_224")(
        least_number=50, init_values=0.1, drop_path_rate=0.1
    ).to(device)
    model.train()
    heads, N, B = model.num_heads, model.embed_len, args.batch
    decay = [
        p for n, p in model.named_parameters() if p.ndim > 1 and "token" not in n and "pos_embed" not in n
    ]
    no_decay = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim > 1 and "token" not in n and "pos_embed" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 224, 224, generator=g).to(device)
    tokens = torch.randint(0, 8192, (B, N - 1), generator=g)
    precision = "bf16" if device.type == "cuda" else "fp32"
    builds = []

    def loader_batch():
        """What the official data loader yields for one batch (its collate of per-sample masks)."""
        t = time.perf_counter()
        per = []
        for _ in range(B):
            perm = torch.cat([torch.ones(1), torch.randperm(N - 1) + 2])
            per.append(attention_mask_full_mapet_1(perm, heads, 50, N))
        mask_q, mask_h, index, upper = (torch.stack(t) for t in zip(*per, strict=True))
        target = tokens[(index * upper)[:, 1:]].reshape(B, -1).long()
        builds.append(time.perf_counter() - t)
        return mask_q.float(), mask_h.float(), index, upper, target

    def step_loss(batch):
        """engine.py's step: masks and targets to the device, forward, its output re-indexing, loss."""
        mask_q, mask_h, index, upper, target = batch
        mask_q, mask_h, target = mask_q.to(device), mask_h.to(device), target.to(device)
        out = model(images, mask_q, mask_h, index)  # (B, K, P)
        out = (
            out.permute(1, 0, 2)[:, upper[index].reshape(B, -1)].reshape(out.shape[1], B, -1).permute(1, 0, 2)
        )
        return F.cross_entropy(out, target)

    step_s, peak = time_train_steps(
        step_loss, model.parameters(), opt, loader_batch, device, args.iters, args.warmup
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
