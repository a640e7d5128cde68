"""`mapet finetune`: end-to-end fine-tuning of a pre-trained encoder on a labelled image folder.

BEiT / MaPeT protocol (paper Sec. 4.1): average pooling of the patch tokens + fc_norm (the encoder's final
norm is dropped), layer-wise lr decay (0.65), label smoothing 0.1, drop path 0.1, AdamW with warmup and
cosine, bicubic RandomResizedCrop + flip; RandAugment (timm's rand-m9-mstd0.5), random erasing and mixup /
cutmix are optional (BEiT's ImageNet recipe turns all on: reprob 0.25, mixup 0.8, cutmix 1.0). Validation:
Resize(S / crop_pct) + CenterCrop(S) at the encoder's input size S, as pretrain.evaluate. Writes
OUT/metrics.jsonl, OUT/result.json and OUT/last.pt (weights-only loadable), checkpointed after every epoch
and on SIGTERM (preemption: at the next optimizer step, mid-epoch); `--resume auto` continues it to the
uninterrupted run's result. Every random draw is keyed: a training image's augmentation and drop path by
(seed, epoch, image), drawn in the loader, mixup / cutmix and random erasing by (seed, step, micro-step,
rank), so a resumed run draws what the uninterrupted one did, for any loader worker count; without mixup,
cutmix and erasing (the defaults), for any split of the global batch over GPUs and accumulation steps too.
Runs under torchrun as DDP; bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from pretrain.checkpoint import FINETUNE_KIND
from pretrain.dashboards import Dashboards, check_dashboards
from pretrain.data import IMAGENET_MEAN, EpochSampler, to_input
from pretrain.evaluate import CenterCropDataset, count_readable, default_crop_pct, in_classes
from pretrain.optim import adamw, layer_decay_groups, lr_at, set_lr
from pretrain.run import Run, compile_checks, loop_checks
from pretrain.vit import VisionTransformer, ViTConfig, drop_path_draws
from tokenkit.device import autocast
from tokenkit.errors import ConfigError, DivergedError, SourceError, require
from tokenkit.images import SampleIndex, decode_image
from tokenkit.journal import atomic_write_bytes
from tokenkit.stopsignal import StopSignal, ignore_sigterm, worker_batches
from tokenkit.views import keyed_rng


@dataclass(frozen=True)
class FinetuneConfig:
    LR_BATCH: ClassVar[int] = (
        64  # the global batch the default lr is tuned for (one process, the default batch)
    )

    epochs: int = 100
    batch_size: int = 64  # per rank and micro-step; global batch = batch_size * world * accum_steps
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    crop_pct: float | None = None  # validation crop; None: pretrain.evaluate.default_crop_pct
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (BEiT / timm: 0.08-1)
    randaug: bool = False
    reprob: float = 0.0  # random erasing probability (BEiT / MAE fine-tuning: 0.25)
    mixup: float = 0.0
    cutmix: float = 0.0
    seed: int = 0
    clip_grad: float | None = (
        None  # the gradient norm's cap; None: no clipping (BEiT's and MAE's fine-tuning)
    )
    keep: int = 2  # checkpoints kept
    workers: int = 2
    device: str = "cpu"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool = False  # recompute each block in backward: far less memory, ~1/3 more compute
    compile: str | None = None  # a torch.compile mode for the training step (pretrain.run.COMPILE_MODES)
    log_to: tuple[str, ...] = ()  # dashboards mirroring metrics.jsonl (pretrain.dashboards)

    def validate(self) -> None:
        check_dashboards(self.log_to)
        require(
            (
                *loop_checks(self),
                ("--accum-steps", self.accum_steps, 1 <= self.accum_steps <= 4096, "in [1, 4096]"),
                ("--layer-decay", self.layer_decay, 1e-3 <= self.layer_decay <= 1, "in [1e-3, 1]"),
                ("--label-smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
                (
                    "--crop-pct",
                    self.crop_pct,
                    self.crop_pct is None or 0.05 <= self.crop_pct <= 1,
                    "in [0.05, 1]",
                ),
                (
                    "--crop-scale",
                    self.crop_scale,
                    1e-3 <= self.crop_scale[0] <= self.crop_scale[1] <= 1,
                    "MIN MAX with 1e-3 <= MIN <= MAX <= 1",
                ),
                ("--reprob", self.reprob, 0 <= self.reprob <= 1, "in [0, 1]"),
                (
                    "--mixup",
                    self.mixup,
                    self.mixup == 0 or 1e-2 <= self.mixup <= 100,
                    "0 (off) or in [0.01, 100]",
                ),
                (
                    "--cutmix",
                    self.cutmix,
                    self.cutmix == 0 or 1e-2 <= self.cutmix <= 100,
                    "0 (off) or in [0.01, 100]",
                ),
            )
        )
        compile_checks(self)


class Classifier(nn.Module):
    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm = nn.Identity()  # avg pooling + fc_norm replaces the final norm (BEiT fine-tuning)
        self.fc_norm = nn.LayerNorm(encoder.cfg.dim, eps=encoder.cfg.eps)
        self.head = nn.Linear(encoder.cfg.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 3, S, S) -> logits (B, classes); drop (B, depth, 2) drop-path draws (pretrain.vit.Block)."""
        h = self.encoder.forward_features(x, drop)  # (B, N, D), final norm dropped
        return self.head(self.fc_norm(h[:, 1:].mean(1)))  # (B, classes)


def classifier_of(ckpt: dict) -> Classifier:
    """The fine-tuned classifier in a loaded `mapet finetune` checkpoint."""
    net = Classifier(VisionTransformer(ViTConfig(**ckpt["vit"])), ckpt["num_classes"])
    net.load_state_dict(ckpt["model"])
    return net.eval()


class RandAugment:
    """timm's `rand-m9-mstd0.5` with torchvision's ops: `num_ops` draws, each applied with probability 0.5 at
    a magnitude drawn from N(magnitude, std) on timm's 0-10 scale, bicubic, filling with the mean pixel.
    (torchvision's RandAugment(2, 9) always applies both ops, at 9 / 30 of each op's range.)"""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, std: float = 0.5):
        self.num_ops, self.magnitude, self.std = num_ops, magnitude, std
        fill = [round(255 * m) for m in IMAGENET_MEAN]
        self.op = v2.RandAugment(
            1, num_magnitude_bins=101, interpolation=v2.InterpolationMode.BICUBIC, fill=fill
        )

    def __call__(self, img):
        for _ in range(self.num_ops):
            m = float(torch.normal(self.magnitude, self.std, ())) if self.std > 0 else self.magnitude
            self.op.magnitude = round(10 * min(max(m, 0.0), 10.0))  # bin of 101 over each op's range
            if float(torch.rand(())) < 0.5:
                img = self.op(img)
        return img


def random_erase(x: torch.Tensor, prob: float) -> torch.Tensor:
    """timm's RandomErasing(prob, mode="pixel") on a normalised batch x (B, 3, S, S), in place: each sample,
    with probability `prob`, gets one box of 2%-33% of its area (aspect 0.3-3.3, 10 tries) filled with N(0, 1)
    noise. Boxes are drawn per sample from torch's CPU generator (seeded per micro-step)."""
    B, _, S, W = x.shape
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for i in range(B):
        if float(torch.rand(())) >= prob:
            continue
        for _ in range(10):
            area = S * W * float(torch.empty(()).uniform_(0.02, 1 / 3))
            aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < S and w < W:
                top, left = int(torch.randint(0, S - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
                x[i, :, top : top + h, left : left + w] = torch.randn(3, h, w, device=x.device, dtype=x.dtype)
                break
    return x


class TrainDataset(Dataset):
    """Training images, each augmented (bicubic RandomResizedCrop, flip, RandAugment) by draws keyed by
    (seed, epoch, image), with its drop-path uniforms (2 per block) from the same key: the same sample
    whichever loader worker, rank or batch reads it."""

    def __init__(
        self, source: SampleIndex, size: int, randaug: bool, depth: int, seed: int = 0, scale=(0.08, 1.0)
    ):
        self.source, self.depth, self.seed, self.epoch = source, depth, seed, 0
        aug = [
            v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
        ]
        if randaug:
            aug.append(RandAugment())
        self.tf = v2.Compose([*aug, v2.PILToTensor()])  # (3, S, S) uint8

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        """(S, S, 3) uint8 pixels (normalised on the device, as every loader here), the label and the
        (depth, 2) float32 drop-path uniforms."""
        img = decode_image(self.source.read_bytes(i), self.source.where(i))
        rng = keyed_rng("augment", self.seed, self.epoch, i)
        with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was (workers 0)
            torch.default_generator.manual_seed(int(rng.integers(2**62)))
            x = self.tf(img)
        return x.permute(1, 2, 0), int(self.source.labels[i]), drop_path_draws(rng, self.depth)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@torch.no_grad()
def accuracy(
    model: nn.Module,
    loader: DataLoader,
    device,
    autocast,
    world: int = 1,
    progress: bool = False,
    answers: list | None = None,
) -> tuple[float, float, int]:
    """Top-1, top-5 (top-k for fewer than 5 classes) and the number of samples they count (unreadable images,
    label -1, excluded), over all ranks. `answers`: a list that receives (label, top-1 prediction) of every
    counted image in loader order (one process: what McNemar's test pairs image by image)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 correct, top-5 correct, total
    for x, y in tqdm(loader, desc="validate", unit="batch", disable=not progress, leave=False):
        keep = y >= 0
        with autocast:
            logits = model(to_input(x, device))  # (B, classes)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()[keep]  # (b, 5)
        hit = top == y[keep][:, None]  # (b, 5)
        if answers is not None:
            answers += zip(y[keep].tolist(), top[:, 0].tolist(), strict=True)
        counts += torch.tensor(
            [float(hit[:, 0].sum()), float(hit.any(1).sum()), float(keep.sum())], dtype=torch.float64
        )
    if world > 1:
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
    top1, top5, total = counts.tolist()
    return top1 / max(total, 1), top5 / max(total, 1), int(total)


def validate_classifier(
    ckpt: dict,
    val: SampleIndex,
    crop_pct: float | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    progress: bool = True,
    name: str = "the checkpoint",
) -> dict:
    """Top-1 / top-5 of the fine-tuned classifier in a loaded `mapet finetune` checkpoint on `val`, each image
    read as fine-tuning validates it (Resize(S / crop_pct) + CenterCrop(S)): `mapet validate`, as BEiT's and
    MAE's `--eval`; with every image's label and prediction, as k-NN and the linear probe give them. Val
    labels are matched by name to the class names the checkpoint records. name: the checkpoint, for
    errors."""
    net = classifier_of(ckpt)
    val = in_classes(val, tuple(ckpt["classes"]), f"{name}'s")
    if len(val) and int(val.labels.max()) >= ckpt["num_classes"]:
        raise SourceError(
            f"{val.root or val.tars[0]}: label {int(val.labels.max())} but {name} has {ckpt['num_classes']} "
            "classes; validate on the classes it was fine-tuned on"
        )
    size = net.encoder.cfg.image_size
    crop_pct = crop_pct or default_crop_pct(size)
    dev = torch.device(device)
    loader = DataLoader(
        CenterCropDataset(val, size, crop_pct),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    answers: list[tuple[int, int]] = []
    top1, top5, n = accuracy(
        net.to(dev), loader, dev, autocast(dev, "auto"), progress=progress, answers=answers
    )
    count_readable(val, n, "validate")
    return {
        "top1": top1,
        "top5": top5,
        "n_val": n,
        "labels": [a for a, _ in answers],  # each counted val image's label and prediction, in val order
        "predictions": [p for _, p in answers],
        "image_size": size,
        "crop_pct": crop_pct,
        "num_classes": ckpt["num_classes"],
    }


# settings that may change on resume; batch_size and accum_steps with the ranks keep their product (check_split)
RESUME_FREE = (
    "workers",
    "device",
    "grad_checkpointing",
    "compile",
    "batch_size",
    "accum_steps",
    "keep",
    "log_to",
)
STOP_EVERY = 10  # optimizer steps between the ranks' checks for a SIGTERM under torchrun (one all-reduce)


def finetune(
    encoder: VisionTransformer,
    train: SampleIndex,
    val: SampleIndex,
    out: Path,
    cfg: FinetuneConfig = FinetuneConfig(),
    progress: bool = True,
    resume: bool | Path = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> dict:
    """Fine-tune on `train`, validate on `val` each epoch; checkpoint OUT/last.pt after every epoch.

    resume: continue OUT/last.pt (same settings), mid-epoch if a SIGTERM stopped it there; every random draw
    is keyed (module docstring), so a resumed run repeats the uninterrupted one. On SIGTERM it trains on to
    the next optimizer step (under torchrun: the next multiple of STOP_EVERY, where the ranks agree),
    checkpoints it and raises Stopped. Under torchrun (world > 1) the model is wrapped in DDP, each rank trains
    on its split of every epoch's permutation and validates its share of `val`.
    """
    # prepare the run: settings, the checkpoint to resume, the data
    cfg.validate()
    compile_checks(cfg, world)
    run = Run(out, FINETUNE_KIND, cfg, resume, (rank, world, barrier), RESUME_FREE, progress)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    if run.ckpt is not None and run.ckpt["num_classes"] != num_classes:
        raise ConfigError(
            f"{run.out}/last.pt: fine-tuned on {run.ckpt['num_classes']} classes, not {num_classes}"
        )
    data = FinetuneData(train, val, encoder, cfg, num_classes, rank, world)
    net, opt = build_classifier(encoder, cfg, num_classes, run)
    history, start, in_epoch = [], 0, {"steps": 0, "step_loss_sum": 0.0}
    if run.ckpt is not None:
        net.load_state_dict(run.ckpt["model"])
        opt.load_state_dict(run.ckpt["optimizer"])
        history, start = run.ckpt["history"], run.ckpt["epoch"] + 1
        in_epoch = run.ckpt.get("in_epoch", in_epoch)  # stopped mid-epoch: the steps of epoch `start` it took
    model = run.wrap(
        torch.compile(net, mode=cfg.compile) if cfg.compile else net
    )  # validation runs `net`, eager
    run.say(data.banner(net, cfg, run, start, in_epoch))
    run.start()
    state = {"vit": asdict(encoder.cfg), "num_classes": num_classes, "classes": list(train.classes),
             "config": asdict(cfg)}  # fmt: skip
    dashboards = Dashboards(cfg.log_to, run.out, asdict(cfg), start, rank)
    with StopSignal() as stop, closing(dashboards):
        for epoch in range(start, cfg.epochs):
            skip = in_epoch["steps"] if epoch == start else 0  # the steps a SIGTERM's checkpoint holds
            carried = in_epoch["step_loss_sum"] if skip and rank == 0 else 0.0
            step, loss_total, stopping = train_epoch(run, model, net, opt, data, epoch, skip, carried, stop)
            taken = step - epoch * data.steps
            if taken < data.steps:  # stopped by a signal mid-epoch: checkpoint the steps it took
                partial = {"steps": taken, "step_loss_sum": loss_total}
                save_rank0(run, (state, net, opt, epoch - 1, history), step, in_epoch=partial)
                raise run.stopped(stop, f"in epoch {epoch} at step {taken} of {data.steps}")
            history.append(evaluate_epoch(net, data, run, epoch, loss_total / data.steps))
            save_rank0(run, (state, net, opt, epoch, history), step, metrics=True)
            dashboards.log(history[-1], epoch, "finetune")
            if stopping and epoch < cfg.epochs - 1:
                raise run.stopped(stop, f"after epoch {epoch}")
    result = {"top1": history[-1]["val_top1"], "top5": history[-1]["val_top5"],
              "best_top1": max(r["val_top1"] for r in history), "epochs": cfg.epochs, "n_val": history[-1]["n_val"],
              "config": asdict(cfg), "num_classes": num_classes}  # fmt: skip
    save_rank0(run, (state, net, opt, cfg.epochs - 1, history), cfg.epochs * data.steps, result=result)
    if rank == 0:
        atomic_write_bytes(run.out / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def build_classifier(encoder: VisionTransformer, cfg: FinetuneConfig, num_classes: int, run: Run) -> tuple:
    """The classifier on `encoder` (drop path rising linearly over the blocks to cfg.drop_path, the same head
    init on every rank) and its AdamW with layer-wise learning-rate decay."""
    rates = torch.linspace(0, cfg.drop_path, len(encoder.blocks)).tolist()
    for blk, rate in zip(encoder.blocks, rates, strict=True):
        blk.drop_path = rate
    encoder.grad_checkpointing = cfg.grad_checkpointing
    torch.manual_seed(cfg.seed)
    net = Classifier(encoder, num_classes).to(run.device)
    return net, adamw(layer_decay_groups(net, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr)


def evaluate_epoch(net, data, run: Run, epoch: int, loss: float) -> dict:
    """The epoch's record: its mean step loss and the validation top-1 / top-5 (eager `net`). A loss that is
    not finite ends the run in one line: the last checkpoint holds the weights from before."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"epoch {epoch}: loss is {loss}; {run.out}/last.pt, the last checkpoint, holds the weights from "
            "before; start again with a lower --lr (another --out)"
        )
    top1, top5, n_val = accuracy(net, data.val_loader, run.device, run.autocast(), run.world)
    return {"epoch": epoch, "loss": loss, "val_top1": top1, "val_top5": top5, "n_val": n_val}


def save_rank0(run: Run, parts: tuple, step: int, metrics: bool = False, **extra) -> None:
    """Rank 0 writes the checkpoint of `step` from `parts` (state, net, opt, last finished epoch, history),
    after OUT/metrics.jsonl when `metrics`: an epoch counts as done only once both are written."""
    if run.rank != 0:
        return
    state, net, opt, epoch, history = parts
    if metrics:
        atomic_write_bytes(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    run.save(checkpoint(state, net, opt, run, epoch, history, **extra), step, run.cfg.keep)


def train_epoch(run: Run, model, net, opt, data, epoch: int, skip: int, carried: float, stop) -> tuple:
    """One epoch's optimizer steps from step `skip` of it (the ones a SIGTERM's checkpoint holds are not
    read again). Returns (the global step reached, the sum of the epoch's step losses over the ranks, whether
    a rank was signalled). A step's loss is the mean of its micro-batches on all ranks (the same for any split
    of the global batch), summed on the device from `carried` (a resumed epoch's sum) and read back once."""
    cfg, steps, world = data.cfg, data.steps, run.world
    share = cfg.accum_steps * world  # micro-batch losses in one step
    loss_sum = torch.tensor(carried, dtype=torch.float64, device=run.device)
    step = first = epoch * steps + skip
    end, total, warmup = (epoch + 1) * steps, cfg.epochs * steps, round(cfg.warmup_epochs * steps)
    model.train()
    with worker_batches(data.loader(epoch, skip, run.device)) as it:  # its workers end with the block
        bar = tqdm(it, total=(steps - skip) * cfg.accum_steps, desc=f"finetune {epoch}", unit="batch",
                   disable=not run.progress, leave=False)  # fmt: skip
        batches = iter(bar)
        while step < end:
            set_lr(opt, lr := lr_at(step, total, warmup, cfg.lr, cfg.min_lr))
            micro = [next(batches) for _ in range(cfg.accum_steps)]
            outs = run.accumulate(model, micro, lambda b, i, s=step: micro_loss(model, b, i, s, data, run))
            for loss, _ in outs:
                loss_sum += loss / share
            run.optimizer_step(opt, net.parameters(), cfg.clip_grad)
            step += 1
            if not bar.disable and step % STOP_EVERY == 0:  # a host sync per 10 steps, for the bar
                mean = (float(loss_sum) - carried) * world / (step - first)  # this rank's
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", refresh=False)
            if step < end and agreed_stop(run, stop, step):
                break
        bar.close()
    (loss_total,), stopping = run.agree([loss_sum], stop)
    return step, loss_total, stopping


def micro_loss(model, batch, micro: int, step: int, data, run: Run) -> tuple[torch.Tensor, None]:
    """One micro-batch's loss: (B, S, S, 3) uint8 images, (B,) labels, (B, depth, 2) drop-path draws; random
    erasing and mixup / cutmix drawn from a generator keyed by (seed, step, micro-step, rank), so a resumed
    run draws the same."""
    cfg = data.cfg
    x, y, drop = batch
    x, y, drop = (
        to_input(x, run.device),
        y.to(run.device, non_blocking=True),
        drop.to(run.device, non_blocking=True),
    )
    torch.manual_seed(int(keyed_rng("finetune", cfg.seed, step, micro, run.rank).integers(2**62)))
    if cfg.reprob > 0:  # per sample, before mixup (as timm's loader does)
        x = random_erase(x, cfg.reprob)
    if cfg.compile == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
    return _loss(model, x, y, drop, data.mixer, cfg.label_smoothing, data.num_classes), None


def agreed_stop(run: Run, stop: StopSignal, steps_done: int) -> bool:
    """Whether to stop after `steps_done` optimizer steps: this process's SIGTERM flag; under torchrun only
    every STOP_EVERY steps, agreed by the ranks so that every rank stops after the same step."""
    if run.world == 1:
        return stop.signum is not None
    return steps_done % STOP_EVERY == 0 and run.agree([], stop)[1]


def checkpoint(state: dict, net, opt, run: Run, epoch: int, history: list, **extra) -> dict:
    """A fine-tuning checkpoint: `state` (vit, classes, config), the last finished epoch and its history, the
    weights and the optimizer; `extra`: the final result, or the steps of an epoch stopped midway."""
    return {**state, "epoch": epoch, "history": history, "model": net.state_dict(), "optimizer": opt.state_dict(),
            "scaler": run.scaler.state_dict(), **extra}  # fmt: skip


class FinetuneData:
    """The training images (augmented, keyed), their per-epoch sampler, the validation loader and the mixer."""

    def __init__(
        self, train: SampleIndex, val: SampleIndex, encoder, cfg, num_classes: int, rank: int, world: int
    ):
        self.cfg, self.num_classes, self.rank, self.world = cfg, num_classes, rank, world
        size = encoder.cfg.image_size
        self.train = TrainDataset(train, size, cfg.randaug, len(encoder.blocks), cfg.seed, cfg.crop_scale)
        self.steps = (
            len(self.train) // (cfg.batch_size * world) // cfg.accum_steps
        )  # optimizer steps per epoch
        if self.steps == 0:
            raise ConfigError(
                f"{train.root or train.tars[0]}: {len(self.train)} images cannot fill one step of "
                f"{cfg.batch_size * cfg.accum_steps * world} (--batch-size {cfg.batch_size} x --accum-steps "
                f"{cfg.accum_steps} x {world} ranks); lower them"
            )
        self.sampler = EpochSampler(len(self.train), cfg.batch_size, rank, world, cfg.seed)
        self.n_val = len(val)
        self.val_loader = DataLoader(
            Subset(CenterCropDataset(val, size, cfg.crop_pct), range(rank, len(val), world)),
            batch_size=cfg.batch_size, num_workers=cfg.workers, worker_init_fn=ignore_sigterm,
        )  # fmt: skip
        mix = [v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup > 0 else []
        mix += [v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix > 0 else []
        self.mixer = v2.RandomChoice(mix) if mix else None

    def loader(self, epoch: int, skip: int, device: torch.device) -> DataLoader:
        """This epoch's training batches, from its `skip`-th optimizer step on."""
        self.train.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip * self.cfg.accum_steps)
        return DataLoader(
            self.train, batch_size=self.cfg.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.cfg.workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_sigterm,
        )  # fmt: skip

    def banner(self, net, cfg, run: Run, start: int, in_epoch: dict) -> str:
        params = sum(p.numel() for p in net.parameters())
        resumed = (
            f"; resuming at epoch {start} step {in_epoch['steps']}" if start or in_epoch["steps"] else ""
        )
        return (
            f"finetune: {params / 1e6:.1f}M parameters, {len(self.train)} train / {self.n_val} val images, "
            f"{self.num_classes} classes; global batch {cfg.batch_size * cfg.accum_steps * self.world} "
            f"({cfg.batch_size} x {cfg.accum_steps} x {self.world} ranks), {self.steps} steps per epoch, "
            f"{cfg.epochs} epochs, lr {cfg.lr:g}, layer decay {cfg.layer_decay:g}, {run.precision} on {run.device}"
            + resumed
        )


def _loss(model, x, y, drop, mixer, label_smoothing: float, num_classes: int) -> torch.Tensor:
    """One micro-batch's loss: cross-entropy with soft targets after mixup / cutmix (label smoothing folded
    into them, as timm's Mixup does), label-smoothed cross-entropy otherwise. drop: (B, depth, 2) drop-path
    draws, each sample's own (a mixed image takes its position's)."""
    if mixer is None:
        return F.cross_entropy(model(x, drop).float(), y, label_smoothing=label_smoothing)
    x, soft = mixer(x, y)  # soft (B, classes)
    soft = soft * (1 - label_smoothing) + label_smoothing / num_classes
    return torch.sum(-soft * F.log_softmax(model(x, drop).float(), dim=-1), dim=-1).mean()
