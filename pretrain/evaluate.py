"""Judging a pre-trained encoder on frozen features: k-NN (DINO protocol) and a linear probe.

Images are labelled folders (class sub-folders) or labelled token stores; each is read at the encoder's input
size S as the DINO / MAE / BEiT evaluations read ImageNet: Resize(S / crop_pct) + CenterCrop(S), bicubic (256
-> 224 by default below 384 px, no crop from 384 px on; 1.0 takes the whole central square), with ImageNet
mean/std. Features are computed once and cached in memory; both evaluations are deterministic.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pretrain.checkpoint import load_checkpoint
from pretrain.data import to_input
from pretrain.export import load_timm
from pretrain.vit import PRESETS, VisionTransformer, ViTConfig, at_image_size, size_checks
from tokenkit.errors import ConfigError, ImageError, SourceError, StoreError, require
from tokenkit.images import SampleIndex, decode_image, list_source, source_from_manifest
from tokenkit.store import TokenStore, verify
from tokenkit.views import to_uint8


def load_vit(
    checkpoint: str,
    model: str = "mapet_small",
    image_size: int | None = None,
    patch_size: int | None = None,
    seed: int = 0,
) -> VisionTransformer:
    """The encoder of a pre-training checkpoint, of a `mapet export` folder, or of a safetensors file with timm
    ViT key names (another codebase's timm ViT: pretrain.export.load_timm), or a random-init one for
    `checkpoint="random"`. With a file, image_size (if given) resamples its positions for that input size
    (pretrain.vit.at_image_size); its patch size is fixed by the weights."""
    require(size_checks(image_size, patch_size))
    if checkpoint == "random":
        if model not in PRESETS:
            raise ConfigError(f"--model {model}: choose one of {', '.join(PRESETS)}")
        kw = dict(PRESETS[model])
        kw.update(
            {k: v for k, v in (("image_size", image_size), ("patch_size", patch_size)) if v is not None}
        )
        cfg = ViTConfig(**kw, drop_path=0.0)
        _check_multiple(cfg.image_size, cfg.patch_size)
        torch.manual_seed(seed)
        return VisionTransformer(cfg).eval()
    path = Path(checkpoint)
    enc = (
        load_timm(path)
        if path.is_dir() or path.suffix == ".safetensors"
        else encoder_of(load_checkpoint(path))
    )
    if patch_size is not None and patch_size != enc.cfg.patch_size:
        raise ConfigError(
            f"{checkpoint}: --patch-size {patch_size}, but its weights have patch size {enc.cfg.patch_size}; "
            "leave --patch-size out"
        )
    size = enc.cfg.image_size if image_size is None else image_size
    _check_multiple(size, enc.cfg.patch_size)
    return at_image_size(enc, size).eval()


def _check_multiple(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ConfigError(f"--image-size {image_size}: not a multiple of the patch size {patch_size}")


def encoder_of(ckpt: dict) -> VisionTransformer:
    """The encoder in a loaded pre-training checkpoint."""
    enc = VisionTransformer(ViTConfig(**ckpt["vit"]))
    state = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    enc.load_state_dict(state)
    return enc.eval()


def labelled_source(path: str | Path) -> SampleIndex:
    """An image folder with class sub-folders, tar shards with .cls, or a token store (its stored rows)."""
    p = Path(path)
    if (p / "manifest.json").exists():
        if problems := verify(p, "zarr"):  # what the trainer checks before step 0, checked here too
            raise StoreError(f"{problems[0]} (tokenkit verify {p} lists every problem)")
        store = TokenStore.open(p)
        rows = store.rows
        g = store.group
        src = source_from_manifest(
            store.manifest["source"],
            g["keys"].get_orthogonal_selection((rows,)),
            g["labels"].get_orthogonal_selection((rows,)),
            g["locators"].get_orthogonal_selection((rows,)),
        )
    else:
        src = list_source(path)
    if (src.labels < 0).any():
        raise SourceError(
            f"{path}: {int((src.labels < 0).sum())} images have no label; pass class sub-folders"
        )
    return src


def labelled_pair(train_path: str | Path, val_path: str | Path) -> tuple[SampleIndex, SampleIndex]:
    """Train and val sources whose labels mean the same classes: class sub-folders are indexed per folder
    (sorted names), so a val folder lacking one of train's classes would shift every later label. Val labels
    are re-indexed by class name into train's classes; a val class that train lacks is refused. Integer
    labels without names (tar shards' .cls) are taken as they are."""
    train = labelled_source(train_path)
    return train, in_classes(labelled_source(val_path), train.classes, f"{train_path}'s")


def in_classes(val: SampleIndex, classes: tuple[str, ...], whose: str) -> SampleIndex:
    """val with its labels re-indexed by class name into `classes` (those `whose` names, for the error); a
    val class outside them is refused. Sources without class names are returned as they are."""
    if not (classes and val.classes) or tuple(classes) == val.classes:
        return val
    if extra := sorted(set(val.classes) - set(classes)):
        raise SourceError(
            f"{val.root or val.tars[0]}: classes {', '.join(extra[:5])} are not among {whose} classes; "
            "evaluate on the same class folders"
        )
    to_train = np.array([list(classes).index(c) for c in val.classes], dtype=np.int64)
    return replace(val, labels=to_train[val.labels], classes=tuple(classes))


def default_crop_pct(image_size: int) -> float:
    """The evaluation crop of DINO's k-NN, MAE's linear probe and BEiT / DeiT fine-tuning: 224 / 256 below
    384 px, none (1.0) from 384 px on."""
    return 0.875 if image_size < 384 else 1.0


def eval_box(width: int, height: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """torchvision's Resize(floor(size / crop_pct)) + CenterCrop(size) as one box (x0, y0, x1, y1) in source
    pixels, for one PIL resize: the same arithmetic (short side to floor(size / crop_pct), long side
    truncated, crop offsets rounded in resized pixels), so the pixels equal the two-step pipeline's."""
    short = math.floor(size / crop_pct)
    rw, rh = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    left, top = round((rw - size) / 2), round((rh - size) / 2)
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


class CenterCropDataset(Dataset):
    """(S, S, 3) uint8 evaluation views (`eval_box`) and labels; unreadable images give label -1."""

    def __init__(self, source: SampleIndex, image_size: int, crop_pct: float | None = None):
        crop_pct = crop_pct or default_crop_pct(image_size)
        assert 0 < crop_pct <= 1, crop_pct
        self.source, self.size, self.crop_pct = source, image_size, crop_pct

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            img = decode_image(self.source.read_bytes(i), self.source.where(i))
        except (ImageError, OSError):
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), -1  # unreadable: dropped later
        box = eval_box(*img.size, self.size, self.crop_pct)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return to_uint8(img), int(self.source.labels[i])  # (S, S, 3) uint8: normalised on the device


@torch.no_grad()
def extract(
    encoder: VisionTransformer,
    source: SampleIndex,
    pool: str = "avg",
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    progress: bool = True,
    crop_pct: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (M, D) float32 (or (M, 2D) for pool="both") and labels (M,) int64 of the readable images."""
    encoder = encoder.to(device).eval()
    loader = DataLoader(
        CenterCropDataset(source, encoder.cfg.image_size, crop_pct),
        batch_size=batch_size,
        num_workers=workers,
    )
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features", unit="batch", disable=not progress):
        feats.append(encoder.forward_head(encoder.forward_features(to_input(x, device)), pool).float().cpu())
        labels.append(y)
    f, y = torch.cat(feats), torch.cat(labels)
    keep = y >= 0
    count_readable(source, int(keep.sum()), "features")
    return f[keep], y[keep]


def count_readable(source: SampleIndex, readable: int, what: str) -> None:
    """Refuse a source none of whose images could be read; name how many were left out otherwise."""
    if readable == 0:
        raise SourceError(
            f"{source.root or source.tars[0]}: none of its {len(source)} images could be read (moved or "
            "damaged); pass the image folder or shards themselves"
        )
    if readable < len(source):
        tqdm.write(
            f"{what}: {len(source) - readable} of {len(source)} images unreadable, left out", file=sys.stderr
        )


def knn_classify(
    train_f,
    train_y,
    val_f,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    block: int | None = None,
    device="cpu",
) -> torch.Tensor:
    """DINO's weighted k-NN: cosine similarity, top-k neighbours vote with weight exp(sim / T). Returns (M,)
    preds on the CPU. The similarities run on `device` (a GPU turns ImageNet's 50k x 1.28M into seconds), in
    blocks of val rows whose (block, Ntrain) similarities take ~1 GiB at most (default)."""
    num_classes = num_classes or int(train_y.max()) + 1
    block = block or max(1, min(1024, 2**28 // len(train_f)))
    k = min(k, len(train_f))
    tf, ty = F.normalize(train_f.to(device), dim=1), train_y.to(device)
    preds = []
    for s in range(0, len(val_f), block):
        vf = F.normalize(val_f[s : s + block].to(device), dim=1)
        top, idx = (vf @ tf.T).topk(k, dim=1)  # (b, k) of the (b, Ntrain) similarities
        votes = tf.new_zeros(len(top), num_classes).scatter_add_(1, ty[idx], (top / temperature).exp())
        preds.append(votes.argmax(1).cpu())
    return torch.cat(preds)


L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the probe's penalties tried when none is given


@dataclass(frozen=True)
class ProbeConfig:
    """Multinomial logistic regression on standardised features, full batch, L-BFGS to convergence: the
    optimum of a convex problem, so no learning rate or epoch count decides the result. Its one setting, the
    L2 penalty, is chosen as CLIP's linear-probe protocol chooses it when `l2` is None: each value of L2_GRID
    is fitted on 80% of train and scored on the held-out 20% (a seeded split), the best (ties: the stronger
    penalty) is refitted on all of train."""

    l2: float | None = None  # on the weights, per feature and class; None: chosen from L2_GRID
    max_iter: int = 1000
    holdout: float = 0.2
    seed: int = 0


def _fit_probe(x, y, num_classes: int, l2: float, max_iter: int) -> torch.nn.Linear:
    """x (M, F) standardised features, y (M,) labels -> the L2-penalised softmax regression's optimum."""
    head = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


@torch.no_grad()
def _accuracy(head: torch.nn.Linear, x, y) -> float:
    return float((head(x).argmax(1) == y).float().mean())


def linear_probe(train_f, train_y, val_f, val_y, cfg: ProbeConfig = ProbeConfig(), device="cpu") -> dict:
    """Fit the probe on (M, F) train features and return val / train top-1, the L2 penalty used, the val
    predictions ("pred", (M,) int64 on the CPU) and, when the penalty was chosen, the held-out top-1 of every
    candidate. Features, labels and the probe live on `device`: on a GPU, ImageNet's full-batch L-BFGS takes
    minutes instead of a day of CPU."""
    train_f, train_y, val_f, val_y = (t.to(device) for t in (train_f, train_y, val_f, val_y))
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xt, xv = (train_f - mean) / std, (val_f - mean) / std
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    l2, sweep = cfg.l2, {}
    if l2 is None:
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        n_hold = max(1, round(cfg.holdout * len(xt)))
        (xf, yf), (xh, yh) = ((xt[i], train_y[i]) for i in (perm[n_hold:], perm[:n_hold]))  # copied once
        for c in L2_GRID:
            sweep[c] = _accuracy(_fit_probe(xf, yf, num_classes, c, cfg.max_iter), xh, yh)
        del xf, yf, xh, yh
        l2 = max(L2_GRID, key=lambda c: (sweep[c], c))
    head = _fit_probe(xt, train_y, num_classes, l2, cfg.max_iter)
    pred = head(xv).argmax(1).cpu()  # (M,) int64, in val order
    res = {
        "top1": top1(pred, val_y.cpu()),
        "train_top1": _accuracy(head, xt, train_y),
        "l2": l2,
        "pred": pred,
    }
    if sweep:
        res["l2_sweep"] = {f"{c:g}": a for c, a in sweep.items()}  # held-out top-1 per candidate
    return res


def top1(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


def majority_baseline(train_y, val_y) -> float:
    return float((val_y == torch.bincount(train_y).argmax()).float().mean())


def mcnemar(a_correct, b_correct) -> tuple[int, int, float]:
    """McNemar's exact test of two classifiers on the same val images: a_correct, b_correct (M,) bool, in the
    same image order. Returns (a right where b is wrong, b right where a is wrong, two-sided p-value): the
    chance of a split of the discordant images at least this uneven if both classifiers were equally good.
    Paired, so it sees differences far smaller than two independent accuracies' intervals would."""
    a, b = (np.asarray(v, dtype=bool) for v in (a_correct, b_correct))
    assert a.shape == b.shape, f"{a.shape} != {b.shape}: not the same val images"
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n, low = n01 + n10, min(n01, n10)
    # P(X <= low), X ~ Binomial(n, 1/2), summed in log space (2^-n underflows past n = 1074; ImageNet's val
    # has 50,000 images)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(low + 1)
    ]
    top = max(logs)
    p = min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))
    return n01, n10, p
