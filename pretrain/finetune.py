"""`mapet finetune`: end-to-end fine-tuning of a pre-trained encoder on a labelled image folder.

BEiT / MaPeT protocol (paper Sec. 4.1): average pooling of the patch tokens + fc_norm (the encoder's final
norm is dropped), layer-wise lr decay (0.65), label smoothing 0.1, drop path 0.1, AdamW with warmup and
cosine; RandAugment (rand-m9-mstd0.5) and mixup / cutmix are optional (the paper uses mixup 0.8, cutmix 1.0).
Validation: the central square at the encoder's input size. Writes OUT/metrics.jsonl, OUT/result.json and
OUT/last.pt (weights-only loadable).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from pretrain.data import IMAGENET_MEAN, IMAGENET_STD
from pretrain.evaluate import CenterCropDataset
from pretrain.train import lr_at
from pretrain.vit import VisionTransformer
from tokenkit.images import SampleIndex, decode_image
from tokenkit.journal import atomic_write_bytes


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    randaug: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    seed: int = 0
    workers: int = 2
    device: str = "cpu"


class Classifier(nn.Module):
    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm = nn.Identity()  # avg pooling + fc_norm replaces the final norm (BEiT fine-tuning)
        self.fc_norm = nn.LayerNorm(encoder.cfg.dim, eps=encoder.cfg.eps)
        self.head = nn.Linear(encoder.cfg.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder.forward_features(x)  # (B, N, D), final norm dropped
        return self.head(self.fc_norm(h[:, 1:].mean(1)))  # (B, classes)


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """One group per (depth, decay?): lr scale layer_decay ** (depth + 1 - layer id)."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder."):
            layer = 0  # patch embedding, CLS, positions
        else:
            layer = depth + 1  # fc_norm, head
        no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        g = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            },
        )
        g["params"].append(p)
    return list(groups.values())


class TrainDataset(Dataset):
    def __init__(self, source: SampleIndex, size: int, randaug: bool):
        self.source = source
        aug = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if randaug:
            aug.append(v2.RandAugment(num_ops=2, magnitude=9))
        self.tf = v2.Compose(
            [
                *aug,
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.tf(decode_image(self.source.read_bytes(i), self.source.keys[i])), int(
            self.source.labels[i]
        )


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        keep = y >= 0
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred[keep] == y[keep]).sum())
        total += int(keep.sum())
    return correct / max(total, 1)


def finetune(
    encoder: VisionTransformer,
    train: SampleIndex,
    val: SampleIndex,
    out: Path,
    cfg: FinetuneConfig = FinetuneConfig(),
    progress: bool = True,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    for blk, rate in zip(
        encoder.blocks, torch.linspace(0, cfg.drop_path, len(encoder.blocks)).tolist(), strict=True
    ):
        blk.drop_path = rate
    model = Classifier(encoder, num_classes).to(device)
    opt = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr)
    size = encoder.cfg.image_size
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        TrainDataset(train, size, cfg.randaug),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train) > cfg.batch_size,
        num_workers=cfg.workers,
        generator=g,
    )
    val_loader = DataLoader(CenterCropDataset(val, size), batch_size=cfg.batch_size, num_workers=cfg.workers)
    mix = []
    if cfg.mixup > 0:
        mix.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mix.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    mixer = v2.RandomChoice(mix) if mix else None
    steps = len(train_loader)
    total, warmup = cfg.epochs * steps, round(cfg.warmup_epochs * steps)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for x, y in tqdm(train_loader, desc=f"finetune {epoch}", disable=not progress, leave=False):
            lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x, y = x.to(device), y.to(device)
            if mixer is not None:
                x, soft = mixer(x, y)  # soft (B, classes)
                soft = soft * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
                loss = torch.sum(-soft * F.log_softmax(model(x), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        acc = accuracy(model, val_loader, device)
        rec = {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1), "val_top1": acc}
        history.append(rec)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"epoch {epoch}: loss is {rec['loss']}; lower --lr")
    result = {
        "top1": history[-1]["val_top1"],
        "best_top1": max(r["val_top1"] for r in history),
        "epochs": cfg.epochs,
        "config": asdict(cfg),
        "num_classes": num_classes,
    }
    buf = io.BytesIO()
    torch.save(
        {
            "kind": "mapet-finetune",
            "vit": asdict(encoder.cfg),
            "num_classes": num_classes,
            "model": model.state_dict(),
            "result": result,
        },
        buf,
    )
    atomic_write_bytes(out / "last.pt", buf.getvalue())
    atomic_write_bytes(out / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    return result
