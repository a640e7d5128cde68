"""`mapet pretrain`: one plain training loop for the MaPeT and BEiT objectives on a token store.

AdamW without decay on norms, biases, LayerScale, position embeddings, CLS and mask tokens; a per-step
cosine schedule with linear warmup; gradient clipping; gradient accumulation; bf16 autocast on CUDA;
optional torch.compile; DDP under torchrun (the lifecycle all of this shares with fine-tuning:
pretrain/run.py). Every random draw of a sample (its view, jitter, factorisation order or BEiT mask, drop
path) is keyed by (seed, epoch, sample key) and drawn in the loader (pretrain.data.SampleDraws), and the data
order by (seed, epoch), so `--resume auto` replays the uninterrupted run exactly on CPU, and a run is the
same function of its seed for any split of its global batch over ranks and accumulation steps
(floating-point summation order aside; streamed shards: over accumulation steps, as each rank streams its own
draw of shards): resumed on other GPUs with the same global batch, it goes on as it would have. Metrics go
to RUN/metrics.jsonl, one per logged step. SIGTERM (what SLURM, Kubernetes and torchrun send before they kill
a job) makes the run checkpoint at its next logged step and raise `Stopped` (tokenkit.stopsignal), so a
preempted run loses no finished step.

The steps, as `pretrain` runs them: prepare the run (settings, resume, the store verified) -> build the model
-> for each optimizer step: accumulate its micro-batches, step -> log and checkpoint where due.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pretrain.beit import BEiT, default_num_masked
from pretrain.checkpoint import KIND, load_checkpoint
from pretrain.dashboards import Dashboards, check_dashboards
from pretrain.data import EpochSampler, SampleDraws, StoreDataset, StreamDataset, to_input
from pretrain.mapet import MaPeT
from pretrain.optim import adamw, lr_at, param_groups, set_lr
from pretrain.run import Run, compile_checks, loop_checks
from pretrain.vit import PRESETS, ViTConfig, size_checks
from tokenkit.errors import ConfigError, DivergedError, StoreError, require
from tokenkit.journal import atomic_write_bytes
from tokenkit.remote import is_url
from tokenkit.stopsignal import StopSignal, ignore_sigterm, worker_batches
from tokenkit.store import TokenStore, verify


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the paper's recipe (AdamW 1.5e-3 at global batch 2048, wd 0.05, 10 warmup epochs, cosine to
    1e-5, clip 3.0, drop path 0.1, 300 epochs)."""

    LR_BATCH: ClassVar[int] = 2048  # the global batch the default lr is the paper's for

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
    init_from: str | None = None  # a pre-training checkpoint whose weights start this run (a new schedule)
    log_to: tuple[str, ...] = ()  # dashboards mirroring metrics.jsonl (pretrain.dashboards)

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
                ("--clip-grad", self.clip_grad, 1e-6 <= self.clip_grad <= 1e6, "in [1e-6, 1e6]"),
                ("--jitter", self.jitter, 0 <= self.jitter <= 1, "in [0, 1]"),
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
        check_dashboards(self.log_to)
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise ConfigError(f"--attn-backend {self.attn_backend}: choose auto, sdpa or flex")
        if self.compile and self.attn_backend == "flex":
            raise ConfigError(
                f"--attn-backend flex with --compile {self.compile}: FlexAttention inside the compiled step trained "
                "away from eager on the GPU (docs/benchmarks.md); use --attn-backend auto (SDPA inside the graph) or "
                "drop --compile"
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


# settings that may change on resume: they do not change the computation
RESUME_FREE = {
    "tokens",
    "out",
    "log_to",
    "workers",
    "device",
    "batch_size",  # with accum_steps and the ranks: only their product counts (run.check_split)
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


def build_model(cfg: TrainConfig, vit: ViTConfig, k: int) -> nn.Module:
    net = MaPeT(vit, k, cfg.num_context, cfg.attn_backend) if cfg.objective == "mapet" else BEiT(vit, k)
    net.encoder.grad_checkpointing = cfg.grad_checkpointing
    return net


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
    if isinstance(objective.net, MaPeT) and objective.net.attention.backend == "flex":
        objective.net.attention_args(device)
    return torch.compile(objective, mode=mode)


def pretrain(
    cfg: TrainConfig,
    resume: bool | Path = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> Path:
    """Train, checkpoint and log into cfg.out. Returns the path of the last checkpoint."""
    # prepare the run: settings, the checkpoint to resume, the store it reads
    cfg.validate()
    compile_checks(cfg, world)
    run = Run(cfg.out, KIND, cfg, resume, (rank, world, barrier), RESUME_FREE, progress)
    data = RunData(cfg, run)
    run.start()
    # build the model, its optimizer and the schedule
    vit = cfg.vit()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_model(cfg, vit, data.store.k).to(run.device)
    if cfg.init_from is not None and run.ckpt is None:
        net.load_state_dict(initial_weights(cfg, vit, data.store.k))
    opt = adamw(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    if run.ckpt is not None:
        net.load_state_dict(run.ckpt["model"])
        opt.load_state_dict(run.ckpt["optimizer"])
    model = run.wrap(compiled(Objective(net), run.device, cfg.compile) if cfg.compile else Objective(net))
    spe = data.steps_per_epoch
    total, warmup = cfg.epochs * spe, round(cfg.warmup_epochs * spe)
    last = total if cfg.max_steps is None else min(total, cfg.max_steps)
    step = run.ckpt["step"] if run.ckpt is not None else 0
    run.say(data.banner(cfg, net, world, total, warmup, run, step))
    log = MetricsLog(run, cfg, step, last)
    state = {"objective": cfg.objective, "vit": asdict(vit), "config": asdict(cfg), **data.identity()}
    net.train()
    with StopSignal() as stop:  # a SIGTERM is acted on at the next logged step
        for epoch, micro_batches in data.steps(step, last, run.device, log):
            set_lr(opt, lr := lr_at(step, total, warmup, cfg.lr, cfg.min_lr))
            outs = run.accumulate(
                model, micro_batches, lambda b, _: forward(model, b, run.device, cfg.compile)
            )
            loss_sum, acc_sum = sum_outputs(outs, run.device)
            grad_norm = run.optimizer_step(opt, net.parameters(), cfg.clip_grad)
            step += 1
            end_of_epoch = step % spe == 0
            save = end_of_epoch or step == last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
            if not (save or log.due(step)):
                continue  # no host-device sync on this step: the GPU runs ahead
            (loss, acc), stopping = run.agree([loss_sum, acc_sum], stop)
            loss, acc = loss / (cfg.accum_steps * world), acc / (cfg.accum_steps * world)
            if not math.isfinite(loss):  # checked before any checkpoint could keep the weights
                log.close()
                raise DivergedError(
                    f"step {step}: loss is {loss}; {run.out}/last.pt, the last checkpoint, holds the weights "
                    "from before; start again with a lower --lr (another --out), or check the store"
                )
            log.write(step, epoch, loss, acc, lr, grad_norm)
            if (save or stopping) and rank == 0:  # a signal: checkpoint this step, then stop
                state.update(epoch=step // spe, model=net.state_dict(), optimizer=opt.state_dict())
                run.save({**state, "scaler": run.scaler.state_dict()}, step, cfg.keep)
            if end_of_epoch or step == last or stopping:
                barrier()
            if stopping and step < last:
                log.close()
                raise stop.checkpointed(f"at step {step}", run.out / "last.pt")
    log.close()
    return run.out / "last.pt"


def initial_weights(cfg: TrainConfig, vit: ViTConfig, k: int) -> dict:
    """The weights of cfg.init_from, a finished (or any) pre-training checkpoint of the same objective, ViT
    and K: the run starts a new schedule (fresh optimizer moments, warmup, cosine) from them."""
    ckpt = load_checkpoint(Path(cfg.init_from))
    theirs = {k_: v for k_, v in ckpt["vit"].items() if k_ != "drop_path"}
    ours = {k_: v for k_, v in asdict(vit).items() if k_ != "drop_path"}
    if ckpt["objective"] != cfg.objective or theirs != ours or ckpt["store"]["k"] != k:
        raise ConfigError(
            f"--init-from {cfg.init_from}: its objective, ViT or K differs from this run's; start from a "
            "checkpoint of the same --objective, --model, --image-size, --patch-size and K"
        )
    return ckpt["model"]


def forward(model: nn.Module, batch, device: torch.device, compile_mode: str | None):
    """One micro-batch's (loss, token top-1): (B, S, S, 3) uint8 pixels, (B, G*G) targets, (B, 3, 2) jitter,
    (B, G*G) orders or masks and (B, depth, 2) drop-path draws, as the loader ships them."""
    pixels, targets, jitter, aux, drop = batch
    images = to_input(pixels, device, jitter)  # colour jitter on the device
    targets, aux, drop = (t.to(device, non_blocking=True) for t in (targets, aux, drop))
    if compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
    return model(images, targets, aux, drop)


def sum_outputs(outs: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches' losses and token top-1s summed, on the device (read back only when logged)."""
    loss_sum, acc_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    for loss, acc in outs:
        loss_sum += loss.float()
        acc_sum += acc.detach().float()
    return loss_sum, acc_sum


class RunData:
    """The store a run trains on, checked before step 0, and its batches: a zarr store read by random access
    (an epoch's permutation, split over the ranks) or webdataset shards streamed."""

    def __init__(self, cfg: TrainConfig, run: Run):
        self.cfg, self.rank, self.world = cfg, run.rank, run.world
        remote = is_url(cfg.tokens)
        if remote and run.rank != 0:
            run.barrier()  # rank 0 mirrors a store given as a URL first; the others then find it mirrored
        self.store = store = TokenStore.open(cfg.tokens)
        if remote and run.rank == 0:
            run.barrier()
        if cfg.data == "zarr" and not store.has_zarr:
            raise ConfigError(
                f"--data zarr: {cfg.tokens} holds only webdataset shards; pass --data wds (or auto) or tokenize "
                "again with --format zarr"
            )
        self.wds = cfg.data == "wds" or (cfg.data == "auto" and not store.has_zarr)
        self.part = "wds" if self.wds else "zarr"  # the files this run reads
        self.files = store.file_stats(store.part(self.part))
        if (
            run.ckpt is None or run.ckpt.get("store_files") != self.files
        ):  # hashed at the start; again if rewritten
            self.verify()
        if not self.wds and len(
            store
        ):  # images come from the recorded source: fail now if it moved or changed
            store.block_source(store.read([0]), 0, cfg.source_root)
        vit, world = cfg.vit(), run.world
        if vit.grid != store.grid:
            raise StoreError(
                f"{cfg.tokens}: store grid {store.grid} != model grid {vit.grid} "
                f"({vit.image_size}/{vit.patch_size}); pass --image-size {store.grid * vit.patch_size}"
            )
        self.batches = (
            (len(store) // (cfg.batch_size * world)) // cfg.accum_steps * cfg.accum_steps
        )  # per epoch
        if self.batches == 0:
            raise ConfigError(
                f"{cfg.tokens}: {len(store)} images cannot fill one step of {cfg.batch_size * cfg.accum_steps * world} "
                f"(--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} x {world} ranks); lower them"
            )
        if run.ckpt is not None and run.ckpt["store"]["tokenizer_id"] != store.tokenizer_id:
            raise StoreError(
                f"{cfg.tokens}: tokenizer {store.tokenizer_id[:16]} != the run's "
                f"{run.ckpt['store']['tokenizer_id'][:16]}; resume with the original token store"
            )
        self.steps_per_epoch = self.batches // cfg.accum_steps

    def verify(self) -> None:
        """Checksums, values, counts, tokenizer: before step 0, each rank its share of the shards; every rank
        refuses on any rank's finding."""
        problems = verify(self.store.root, self.part, self.rank, self.world)
        if self.world > 1:
            found = [None] * self.world
            torch.distributed.all_gather_object(found, problems)
            problems = [p for ps in found for p in ps]
        if problems:
            raise StoreError(
                f"{problems[0]} (refusing to train on it; 'tokenkit verify' lists every problem)"
            )

    def identity(self) -> dict:
        """What a checkpoint records of the store: what was verified (a resume re-hashes only if it changed)
        and which tokens."""
        s = self.store
        return {
            "store_files": self.files,
            "store": {"tokenizer_id": s.tokenizer_id, "k": s.k, "grid": s.grid, "num_views": s.num_views},
        }

    def banner(self, cfg, net, world, total, warmup, run, step) -> str:
        params = sum(p.numel() for p in net.parameters())
        s = self.store
        return (
            f"{cfg.objective} {cfg.model}: {params / 1e6:.1f}M parameters, K {s.k}, {len(s)} images x "
            f"{s.num_views} views ({self.part}); global batch {cfg.batch_size * cfg.accum_steps * world} "
            f"({cfg.batch_size} x {cfg.accum_steps} x {world} ranks), {self.steps_per_epoch} steps per epoch, "
            f"{total} steps, warmup {warmup}, lr {cfg.lr:g}, {run.precision} on {run.device}"
            + (f"; resuming at step {step}" if step else "")
        )

    def _dataset(self):
        cfg, vit = self.cfg, self.cfg.vit()
        draws = SampleDraws(
            cfg.objective, vit.depth, default_num_masked(vit.num_patches) if cfg.objective == "beit" else 0
        )
        if self.wds:
            ds = StreamDataset(
                self.store.root, vit.image_size, cfg.batch_size, self.batches, draws, self.rank, self.world, cfg.seed,
                cfg.jitter,
            )  # fmt: skip
            return ds, None
        ds = StoreDataset(self.store, vit.image_size, draws, cfg.seed, cfg.jitter, cfg.source_root)
        return ds, EpochSampler(len(ds), cfg.batch_size, self.rank, self.world, cfg.seed)

    def steps(
        self, step: int, last: int, device: torch.device, log: MetricsLog
    ) -> Iterator[tuple[int, list]]:
        """(epoch, its micro-batches) of each optimizer step from `step` to `last`: one DataLoader an epoch,
        which skips the batches a resumed epoch already trained on; the time spent waiting for batches goes to
        `log`."""
        cfg, spe = self.cfg, self.steps_per_epoch
        ds, sampler = self._dataset()
        kw = (
            dict(batch_size=None)
            if sampler is None
            else dict(batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
        )
        while step < last:
            epoch, start = divmod(step, spe)
            if sampler is None:
                ds.set_epoch(epoch, start * cfg.accum_steps)
            else:
                ds.set_epoch(epoch)
                sampler.set_epoch(epoch, start * cfg.accum_steps)
            loader = DataLoader(
                ds, num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
                worker_init_fn=ignore_sigterm, **kw,
            )  # fmt: skip
            with worker_batches(loader) as it:  # its workers end with the block, also on an error
                while step < last and step // spe == epoch:
                    t = time.perf_counter()
                    micro = [next(it) for _ in range(cfg.accum_steps)]
                    log.waited += time.perf_counter() - t
                    yield epoch, micro
                    step += 1


class MetricsLog:
    """RUN/metrics.jsonl, one line per logged step (rank 0), and the progress bar."""

    def __init__(self, run: Run, cfg: TrainConfig, step: int, last: int):
        self.run, self.cfg, self.last = run, cfg, last
        self.path = run.out / "metrics.jsonl"
        if run.rank == 0:
            if step == 0:
                atomic_write_bytes(
                    run.out / "config.json", (json.dumps(asdict(cfg), indent=1) + "\n").encode()
                )
            truncate_metrics(self.path, step)  # a killed run may have logged past its last checkpoint
        self.dashboards = Dashboards(cfg.log_to, run.out, asdict(cfg), step, run.rank)
        self.bar = tqdm(total=last, initial=step, unit="step", disable=not run.progress, desc=cfg.objective)
        self.t0 = self.t_log = time.perf_counter()
        self.seen, self.waited = (
            0,
            0.0,
        )  # images since the start; seconds blocked on the loader since the last line

    def due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.last or step == 1

    def write(self, step: int, epoch: int, loss: float, acc: float, lr: float, grad_norm) -> None:
        """Called at every step that logs or checkpoints (after the ranks agreed); writes a line if one is due."""
        cfg = self.cfg
        self.seen += cfg.batch_size * cfg.accum_steps * self.run.world * (step - self.bar.n)
        self.bar.update(step - self.bar.n)
        if not self.due(step) or self.run.rank != 0:
            return
        now = time.perf_counter()
        ips, wait = (
            self.seen / (now - self.t0),
            self.waited / (now - self.t_log),
        )  # wait > ~0.1: more --workers
        self.waited, self.t_log = 0.0, now
        rec = {"step": step, "epoch": epoch, "loss": loss, "token_acc": acc, "lr": lr, "grad_norm": float(grad_norm),
               "img_per_s": ips, "data_wait": wait}  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.dashboards.log(rec, step, "pretrain")
        self.bar.set_postfix(
            loss=f"{loss:.4f}", acc=f"{acc:.3f}", ips=f"{ips:.1f}", wait=f"{100 * wait:.0f}%"
        )

    def close(self) -> None:
        self.bar.close()
        self.dashboards.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (logged by a run killed before its next checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
