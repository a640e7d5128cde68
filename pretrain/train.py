"""`mapet pretrain`: one plain training loop for the MaPeT and BEiT objectives on a token store.

AdamW without decay on norms, biases, LayerScale, position embeddings, CLS and mask tokens; a per-step
cosine schedule with linear warmup; gradient clipping; gradient accumulation; bf16 autocast on CUDA;
optional torch.compile; DDP under torchrun. Every random draw of a sample (its view, jitter, factorisation
order or BEiT mask, drop path) is keyed by (seed, epoch, sample key) and drawn in the loader
(pretrain.data.SampleDraws), and the data order by (seed, epoch), so `--resume auto` replays the
uninterrupted run exactly on CPU, and a run is the same function of its seed for any split of its global
batch over ranks and accumulation steps (floating-point summation order aside; streamed shards: over
accumulation steps, as each rank streams its own draw of shards): resumed on other GPUs with the same global
batch (check_split), it goes on as it would have. Metrics go to RUN/metrics.jsonl, one per logged step.
SIGTERM (what SLURM, Kubernetes and torchrun send before they kill a job) makes the run checkpoint at its
next logged step and raise `Stopped` (tokenkit.stopsignal), so a preempted run loses no finished step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pretrain.beit import BEiT
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.data import EpochSampler, SampleDraws, StoreDataset, StreamDataset, to_input
from pretrain.mapet import MaPeT
from pretrain.vit import PRESETS, ViTConfig
from tokenkit.errors import (
    MAX_BATCH,
    MAX_SIDE,
    MAX_WORKERS,
    ConfigError,
    DivergedError,
    StoreError,
    require,
    seed_check,
)
from tokenkit.journal import atomic_write_bytes
from tokenkit.stopsignal import StopSignal, ignore_sigterm, worker_batches
from tokenkit.store import TokenStore, verify

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes --compile takes


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the paper's recipe (AdamW 1.5e-3 at global batch 2048, wd 0.05, 10 warmup epochs, cosine to
    1e-5, clip 3.0, drop path 0.1, 300 epochs)."""

    tokens: str
    out: str
    model: str = "mapet_small"
    objective: str = "mapet"  # "mapet" | "beit"
    epochs: int = 300
    batch_size: int = 256  # per rank and micro-step; global batch = batch_size * world * accum_steps
    accum_steps: int = 1
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    drop_path: float = 0.1
    image_size: int | None = None  # None: the preset's
    patch_size: int | None = None
    num_context: int | None = None  # MaPeT c; None: CLS + 25% of the patches (50 of 197)
    jitter: float = 0.4
    data: str = "auto"  # "zarr" | "wds" | "auto" (zarr when the store has it)
    seed: int = 0
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    compile: str | None = None  # a torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    attn_backend: str = "auto"
    grad_checkpointing: bool = False  # recompute each block in backward: far less memory, ~1/3 more compute
    max_steps: int | None = None  # stop early (smoke runs, benchmarks); the schedule still spans all epochs
    ckpt_every: int = 0  # steps between checkpoints, 0: at the end of each epoch only
    keep: int = 2
    log_every: int = 10
    source_root: str | None = None

    def vit(self) -> ViTConfig:
        if self.model not in PRESETS:
            raise ConfigError(f"--model {self.model}: choose one of {', '.join(PRESETS)}")
        kw = dict(PRESETS[self.model], drop_path=self.drop_path)
        if self.image_size is not None:
            kw["image_size"] = self.image_size
        if self.patch_size is not None:
            kw["patch_size"] = self.patch_size
        cfg = ViTConfig(**kw)
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(
                f"--image-size {cfg.image_size}: not a multiple of --patch-size {cfg.patch_size}"
            )
        return cfg

    def validate(self) -> None:
        if self.objective not in ("mapet", "beit"):
            raise ConfigError(f"--objective {self.objective}: choose mapet or beit")
        if self.data not in ("auto", "zarr", "wds"):
            raise ConfigError(f"--data {self.data}: choose auto, zarr or wds")
        require(
            (
                *loop_checks(self),
                ("--accum-steps", self.accum_steps, 1 <= self.accum_steps <= 4096, "in [1, 4096]"),
                ("--clip-grad", self.clip_grad, 1e-6 <= self.clip_grad <= 1e6, "in [1e-6, 1e6]"),
                ("--jitter", self.jitter, 0 <= self.jitter <= 1, "in [0, 1]"),
                ("--keep", self.keep, 1 <= self.keep <= 10**6, "in [1, 10^6]"),
                ("--log-every", self.log_every, 1 <= self.log_every <= 10**9, "in [1, 10^9]"),
                (
                    "--ckpt-every",
                    self.ckpt_every,
                    0 <= self.ckpt_every <= 10**9,
                    "in [0, 10^9] (0: per epoch)",
                ),
                (
                    "--max-steps",
                    self.max_steps,
                    self.max_steps is None or 1 <= self.max_steps <= 10**12,
                    ">= 1",
                ),
                ("--betas", self.betas, all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
                *size_checks(self.image_size, self.patch_size),
            )
        )
        compile_checks(self)
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise ConfigError(f"--attn-backend {self.attn_backend}: choose auto, sdpa or flex")
        if self.compile and self.attn_backend == "flex":
            raise ConfigError(
                f"--attn-backend flex with --compile {self.compile}: FlexAttention inside the compiled step trained "
                "away from eager on an H100 under torch 2.11 (docs/benchmarks.md); use --attn-backend auto (SDPA "
                "inside the graph) or drop --compile"
            )
        n = self.vit().num_patches + 1  # N: CLS + patches
        if self.num_context is not None and self.objective != "mapet":
            raise ConfigError(
                f"--num-context {self.num_context}: a MaPeT setting; BEiT masks 40% of the patches"
            )
        if self.num_context is not None and not 1 <= self.num_context <= n - 1:
            raise ConfigError(
                f"--num-context {self.num_context}: must be in [1, {n - 1}] for {n} tokens (CLS counts; the "
                "rest are predicted)"
            )


def compile_checks(cfg, world: int = 1) -> None:
    """--compile MODE settings that cannot run (pre-training and fine-tuning): a one-line ConfigError."""
    if cfg.compile not in (None, *COMPILE_MODES):
        raise ConfigError(f"--compile {cfg.compile}: choose one of {', '.join(COMPILE_MODES)}")
    if cfg.compile != "reduce-overhead":
        return
    if cfg.accum_steps > 1:
        raise ConfigError(
            f"--compile reduce-overhead with --accum-steps {cfg.accum_steps}: CUDA graphs reuse the memory of "
            "the gradients being accumulated (pytorch/pytorch#169545); use --compile (default mode)"
        )
    if world > 1:
        raise ConfigError(
            "--compile reduce-overhead under torchrun: CUDA graphs with DDP's gradient hooks are not tested "
            "here; use --compile (default mode), whose launch savings matter less at training batch sizes"
        )


def check_split(where: str, was: dict, was_world: int, cfg, world: int) -> None:
    """A resume may split the run's global batch (--batch-size x --accum-steps x ranks) another way: more GPUs,
    or fewer with more accumulation. It may not change it: the schedule counts optimizer steps, and an epoch's
    permutation gives each step the same images under any split of the same global batch (EpochSampler), each
    with the same draws (SampleDraws).
    `was`: the checkpoint's config; was_world: its ranks. A one-line ConfigError naming both and the fix."""
    old, new = was["batch_size"] * was["accum_steps"] * was_world, cfg.batch_size * cfg.accum_steps * world
    if old == new:
        return
    per = cfg.batch_size * world  # one micro-step of this launch
    fix = f"--accum-steps {old // per}" if old % per == 0 else f"--batch-size x --accum-steps x ranks = {old}"
    raise ConfigError(
        f"{where}: the run's global batch is {old} (--batch-size {was['batch_size']} x --accum-steps "
        f"{was['accum_steps']} x {was_world} ranks), this launch's {new} ({cfg.batch_size} x {cfg.accum_steps} "
        f"x {world}); keep it: {fix}"
    )


def size_checks(image_size: int | None, patch_size: int | None) -> tuple:
    """require() entries for --image-size / --patch-size: left out (None: the preset's or the weights') or in
    [1, 8192]."""
    return (
        (
            "--image-size",
            image_size,
            image_size is None or 1 <= image_size <= MAX_SIDE,
            f"in [1, {MAX_SIDE}]",
        ),
        (
            "--patch-size",
            patch_size,
            patch_size is None or 1 <= patch_size <= MAX_SIDE,
            f"in [1, {MAX_SIDE}]",
        ),
    )


def loop_checks(cfg) -> tuple:
    """require() entries for the settings every training loop here has (pre-training and fine-tuning): each
    finite and in a range far beyond any real recipe, so a typo fails here, not hours in."""
    return (
        ("--epochs", cfg.epochs, 1 <= cfg.epochs <= 10**6, "in [1, 10^6]"),
        ("--batch-size", cfg.batch_size, 1 <= cfg.batch_size <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
        ("--lr", cfg.lr, 1e-12 <= cfg.lr <= 10, "in [1e-12, 10]"),
        ("--min-lr", cfg.min_lr, 0 <= cfg.min_lr <= cfg.lr, "in [0, --lr]"),
        ("--warmup-epochs", cfg.warmup_epochs, 0 <= cfg.warmup_epochs <= 10**6, "in [0, 10^6]"),
        ("--weight-decay", cfg.weight_decay, 0 <= cfg.weight_decay <= 10, "in [0, 10]"),
        ("--drop-path", cfg.drop_path, 0 <= cfg.drop_path < 1, "in [0, 1)"),
        ("--workers", cfg.workers, 0 <= cfg.workers <= MAX_WORKERS, f"in [0, {MAX_WORKERS}]"),
        seed_check(cfg.seed),
    )


def build_model(cfg: TrainConfig, vit: ViTConfig, k: int) -> nn.Module:
    net = MaPeT(vit, k, cfg.num_context, cfg.attn_backend) if cfg.objective == "mapet" else BEiT(vit, k)
    net.encoder.grad_checkpointing = cfg.grad_checkpointing
    return net


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-d parameters (norms, biases, LayerScale) nor on position / CLS / mask tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on CPU and CUDA: one pass over all parameters instead of a loop of
    small ops per tensor (about half the optimizer time of a ViT-T/S step on CPU; same update)."""
    device = next(p for g in groups for p in g["params"]).device
    return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kw)


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0, then cosine from lr to min_lr, per step."""
    if step < warmup:
        return lr * step / max(warmup, 1)
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


class Objective(nn.Module):
    """What DDP wraps: forward = (loss, token top-1) of one micro-batch."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images, targets, aux, drop):
        return self.net.loss(images, targets, aux, drop)


def compiled(objective: Objective, device: torch.device, mode: str | None = None) -> nn.Module:
    """torch.compile of the objective (--compile MODE). MaPeT with an explicit FlexAttention backend gets its
    BlockMasks built first, outside the graph (else their construction is traced into the first graph and the
    model compiles twice); "auto" runs SDPA inside the graph (MaPeT.attention_args). With mode
    "reduce-overhead" (CUDA graphs) call torch.compiler.cudagraph_mark_step_begin() before each step: the
    graphs' outputs of the step before are then dead and their memory reused."""
    if isinstance(objective.net, MaPeT) and objective.net.attn_backend == "flex":
        objective.net.attention_args(device)
    return torch.compile(objective, mode=mode)


def pretrain(
    cfg: TrainConfig,
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> Path:
    """Train, checkpoint and log into cfg.out. Returns the path of the last checkpoint."""
    cfg.validate()
    compile_checks(cfg, world)
    run = Path(cfg.out)
    store = TokenStore.open(cfg.tokens)
    if cfg.data == "zarr" and not store.has_zarr:
        raise ConfigError(
            f"--data zarr: {cfg.tokens} holds only webdataset shards; pass --data wds (or auto) or tokenize "
            "again with --format zarr"
        )
    use_wds = cfg.data == "wds" or (cfg.data == "auto" and not store.has_zarr)
    part = "wds" if use_wds else "zarr"  # the files this run reads
    ckpt = load_checkpoint(run / "last.pt") if resume and (run / "last.pt").exists() else None
    store_files = store.file_stats(store.part(part))
    if ckpt is None or ckpt.get("store_files") != store_files:  # hashed at the start; again if rewritten
        problems = verify(cfg.tokens, part, rank, world)  # checksums, counts, tokenizer: before step 0
        if world > 1:  # each rank hashed its share of the shards; every rank refuses on any rank's finding
            found = [None] * world
            torch.distributed.all_gather_object(found, problems)
            problems = [p for ps in found for p in ps]
        if problems:
            raise StoreError(
                f"{problems[0]} (refusing to train on it; 'tokenkit verify' lists every problem)"
            )
    if not use_wds and len(store):  # images come from the recorded source: fail now if it moved or changed
        store.block_source(store.read([0]), 0, cfg.source_root)
    vit = cfg.vit()
    if vit.grid != store.grid:
        raise StoreError(
            f"{cfg.tokens}: store grid {store.grid} != model grid {vit.grid} "
            f"({vit.image_size}/{vit.patch_size}); pass --image-size {store.grid * vit.patch_size}"
        )
    per_step = cfg.batch_size * cfg.accum_steps * world
    batches_per_epoch = (len(store) // (cfg.batch_size * world)) // cfg.accum_steps * cfg.accum_steps
    if batches_per_epoch == 0:
        raise ConfigError(
            f"{cfg.tokens}: {len(store)} images cannot fill one step of {per_step} "
            f"(--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} x {world} ranks); lower them"
        )
    if ckpt is not None:
        was, now = _math_fields(ckpt["train"]), _math_fields(asdict(cfg))
        if was != now:
            diff = ", ".join(f"{k} {was[k]} -> {now[k]}" for k in was if was[k] != now.get(k))
            raise ConfigError(
                f"{run}/last.pt: the run was trained with other settings ({diff}); resume with the same flags"
            )
        check_split(f"{run}/last.pt", ckpt["train"], ckpt.get("world", world), cfg, world)
        if ckpt["store"]["tokenizer_id"] != store.tokenizer_id:
            raise StoreError(
                f"{cfg.tokens}: tokenizer {store.tokenizer_id[:16]} != the run's "
                f"{ckpt['store']['tokenizer_id'][:16]}; resume with the original token store"
            )
    elif (run / "last.pt").exists():
        raise ConfigError(f"{run}: holds a run; pass --resume auto to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for tmp in run.glob(".*.tmp-*"):  # torn writes of a killed run; never valid
            tmp.unlink()

    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_model(cfg, vit, store.k).to(device)
    opt = adamw(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    model = compiled(Objective(net), device, cfg.compile) if cfg.compile else Objective(net)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16")
        else nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if ckpt is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])

    steps_per_epoch = batches_per_epoch // cfg.accum_steps
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    last = total if cfg.max_steps is None else min(total, cfg.max_steps)
    step = ckpt["step"] if ckpt is not None else 0
    if progress and rank == 0:
        params = sum(p.numel() for p in net.parameters())
        print(
            f"{cfg.objective} {cfg.model}: {params / 1e6:.1f}M parameters, K {store.k}, {len(store)} images x "
            f"{store.num_views} views ({part}); global batch {per_step} ({cfg.batch_size} x {cfg.accum_steps} "
            f"x {world} ranks), {steps_per_epoch} steps per epoch, {total} steps, warmup {warmup}, "
            f"lr {cfg.lr:g}, {precision} on {device}" + (f"; resuming at step {step}" if step else "")
        )

    draws = SampleDraws(cfg.objective, vit.depth, net.num_masked if cfg.objective == "beit" else 0)
    if use_wds:
        dataset = StreamDataset(
            cfg.tokens,
            vit.image_size,
            cfg.batch_size,
            batches_per_epoch,
            draws,
            rank,
            world,
            cfg.seed,
            cfg.jitter,
        )
        loader_kw = dict(batch_size=None)
    else:
        dataset = StoreDataset(store, vit.image_size, draws, cfg.seed, cfg.jitter, cfg.source_root)
        sampler = EpochSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed)
        loader_kw = dict(batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    metrics_path = run / "metrics.jsonl"
    if rank == 0:
        if step == 0:
            atomic_write_bytes(run / "config.json", (json.dumps(asdict(cfg), indent=1) + "\n").encode())
        _truncate_metrics(metrics_path, step)  # a killed run may have logged past its last checkpoint
    bar = tqdm(total=last, initial=step, unit="step", disable=not progress or rank != 0, desc=cfg.objective)
    meta = {
        "objective": cfg.objective,
        "vit": asdict(vit),
        "train": asdict(cfg),
        "world": world,  # ranks: a resume may split the global batch another way (check_split)
        "store_files": store_files,  # what was verified: a resume re-hashes only if these changed
        "store": {
            "tokenizer_id": store.tokenizer_id,
            "k": store.k,
            "grid": store.grid,
            "num_views": store.num_views,
        },
    }
    t0, seen = time.perf_counter(), 0
    waited, t_log = 0.0, t0  # seconds blocked on the data loader since the last log, and when that was
    net.train()
    with StopSignal() as stop:  # a SIGTERM is acted on at the next logged step
        while step < last:
            epoch, start = divmod(step, steps_per_epoch)
            if use_wds:
                dataset.set_epoch(epoch, start * cfg.accum_steps)  # skips the batches already trained on
            else:
                dataset.set_epoch(epoch)
                sampler.set_epoch(epoch, start * cfg.accum_steps)
            loader = DataLoader(
                dataset,
                num_workers=cfg.workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                worker_init_fn=ignore_sigterm,
                **loader_kw,
            )
            with worker_batches(loader) as it:  # its workers end with the block, also on an error
                while step < last and step // steps_per_epoch == epoch:
                    lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    loss_sum = torch.zeros((), device=device)  # on the device: read back only when logged
                    acc_sum = torch.zeros((), device=device)
                    for micro in range(cfg.accum_steps):
                        t_wait = time.perf_counter()
                        # (B, S, S, 3) uint8, (B, G*G), (B, 3, 2), (B, G*G) orders or masks, (B, depth, 2)
                        pixels, targets, jitter, aux, drop = next(it)
                        waited += time.perf_counter() - t_wait
                        images = to_input(pixels, device, jitter)  # colour jitter on the device
                        targets, aux, drop = (t.to(device, non_blocking=True) for t in (targets, aux, drop))
                        sync = (
                            nullcontext() if (world == 1 or micro == cfg.accum_steps - 1) else model.no_sync()
                        )
                        if cfg.compile == "reduce-overhead":
                            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead
                        with sync:
                            with autocast:
                                loss, acc = model(images, targets, aux, drop)
                            scaler.scale(loss / cfg.accum_steps).backward()
                        loss_sum += loss.detach().float()
                        acc_sum += acc.detach().float()
                    scaler.unscale_(opt)
                    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    seen += per_step
                    bar.update(1)
                    end_of_epoch = step % steps_per_epoch == 0
                    save = end_of_epoch or step == last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
                    log = step % cfg.log_every == 0 or step == last or step == 1
                    if not (log or save):
                        continue  # no host-device sync on this step: the GPU runs ahead
                    signalled = torch.tensor(float(stop.signum is not None), device=device)
                    sums = torch.stack([loss_sum, acc_sum, signalled])
                    # every rank's mean and signal: the same NaN and stop verdicts on every rank
                    if world > 1:
                        torch.distributed.all_reduce(sums)
                    loss_v, acc_v, stopping = sums.tolist()
                    loss_v, acc_v = loss_v / (cfg.accum_steps * world), acc_v / (cfg.accum_steps * world)
                    save = save or stopping > 0  # a signal: checkpoint this step, then stop
                    if not math.isfinite(loss_v):  # checked before any checkpoint could keep the weights
                        raise DivergedError(
                            f"step {step}: loss is {loss_v}; {run}/last.pt, the last checkpoint, holds the weights "
                            "from before; start again with a lower --lr (another --out), or check the store"
                        )
                    if log and rank == 0:
                        now = time.perf_counter()
                        ips = seen / (now - t0)
                        data_wait = waited / (now - t_log)  # > ~0.1: the loader is the bottleneck (--workers)
                        waited, t_log = 0.0, now
                        rec = {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_v,
                            "token_acc": acc_v,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "img_per_s": ips,
                            "data_wait": data_wait,
                        }
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        bar.set_postfix(
                            loss=f"{loss_v:.4f}",
                            acc=f"{acc_v:.3f}",
                            ips=f"{ips:.1f}",
                            wait=f"{100 * data_wait:.0f}%",
                        )
                    if save and rank == 0:
                        save_checkpoint(
                            run,
                            {
                                **meta,
                                "step": step,
                                "epoch": step // steps_per_epoch,
                                "model": net.state_dict(),
                                "optimizer": opt.state_dict(),
                                "scaler": scaler.state_dict(),
                            },
                            cfg.keep,
                        )
                    if end_of_epoch or step == last or stopping:
                        barrier()
                    if stopping and step < last:
                        bar.close()
                        raise stop.checkpointed(f"at step {step}", run / "last.pt")
    bar.close()
    return run / "last.pt"


# settings that may change on resume: they do not change the computation
RESUME_FREE = {
    "tokens",
    "out",
    "workers",
    "device",
    "batch_size",  # with accum_steps and the ranks: only their product counts (check_split)
    "accum_steps",
    "max_steps",
    "ckpt_every",
    "keep",
    "log_every",
    "compile",
    "attn_backend",  # the same attention by another kernel: a GPU run (FlexAttention) may go on on the CPU
    "grad_checkpointing",
    "source_root",
}


def _math_fields(d: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(d)).items() if k not in RESUME_FREE}


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
