"""A training run's lifecycle, shared by pre-training (train.py) and fine-tuning (finetune.py).

A run folder is written by rank 0 of a torchrun job (or by the one process). `Run` does what both loops do
the same way: resuming (the checkpoint; the settings that may change and those that may not; another split
of the same global batch), the device and precision, DDP, an optimizer step over accumulated micro-batches
(gradient scaling for fp16, clipping), the ranks' agreement on logged values and on a SIGTERM, and the one
checkpoint writer (rotation, `last.pt`, atomic). Each loop says what its step computes and when it logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pretrain.checkpoint import FINETUNE_KIND, load_checkpoint, point_last, save_checkpoint
from tokenkit.device import autocast, pick_device, resolve_precision
from tokenkit.errors import MAX_BATCH, MAX_WORKERS, ConfigError, seed_check
from tokenkit.stopsignal import Stopped, StopSignal

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes --compile takes


def loop_checks(cfg) -> tuple:
    """require() entries for the settings every training loop here has (pre-training and fine-tuning): each
    finite and in a range far beyond any real recipe, so a typo fails here, not hours in."""
    return (
        ("--epochs", cfg.epochs, 1 <= cfg.epochs <= 10**6, "in [1, 10^6]"),
        ("--batch-size", cfg.batch_size, 1 <= cfg.batch_size <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
        ("--accum-steps", cfg.accum_steps, 1 <= cfg.accum_steps <= 4096, "in [1, 4096]"),
        ("--lr", cfg.lr, 1e-12 <= cfg.lr <= 10, "in [1e-12, 10]"),
        ("--min-lr", cfg.min_lr, 0 <= cfg.min_lr <= cfg.lr, "in [0, --lr]"),
        ("--warmup-epochs", cfg.warmup_epochs, 0 <= cfg.warmup_epochs <= 10**6, "in [0, 10^6]"),
        ("--weight-decay", cfg.weight_decay, 0 <= cfg.weight_decay <= 10, "in [0, 10]"),
        ("--drop-path", cfg.drop_path, 0 <= cfg.drop_path < 1, "in [0, 1)"),
        ("--workers", cfg.workers, 0 <= cfg.workers <= MAX_WORKERS, f"in [0, {MAX_WORKERS}]"),
        ("--keep", cfg.keep, 1 <= cfg.keep <= 10**6, "in [1, 10^6]"),
        seed_check(cfg.seed),
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


def settings_diff(was: dict, now: dict, free) -> str:
    """`name old -> new` for each setting that differs between a run's config and this launch's, but those
    in `free` (they change no number the run computes)."""
    was, now = json.loads(json.dumps(was)), json.loads(json.dumps(now))  # tuples as lists, as stored
    keys = [k for k in {**was, **now} if k not in free and was.get(k) != now.get(k)]
    return ", ".join(f"{k} {was.get(k)} -> {now.get(k)}" for k in keys)


def check_split(where: str, was: dict, was_world: int, cfg, world: int) -> None:
    """A resume may split the run's global batch (--batch-size x --accum-steps x ranks) another way: more GPUs,
    or fewer with more accumulation. It may not change it: the schedule counts optimizer steps, and an epoch's
    permutation gives each step the same images under any split of the same global batch, each with the same
    draws. `was`: the checkpoint's config; was_world: its ranks. A one-line ConfigError naming both and the
    fix."""
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


class Run:
    """One run folder: `out`, its kind of checkpoint, this launch's config and ranks."""

    def __init__(self, out, kind: str, cfg, resume: bool, dist: tuple, free, progress: bool = True):
        """dist: (rank, world, barrier); free: the config fields a resume may change."""
        self.out, self.kind, self.cfg = Path(out), kind, cfg
        self.rank, self.world, barrier = dist
        self.barrier = barrier or (torch.distributed.barrier if self.world > 1 else lambda: None)
        self.progress = progress and self.rank == 0
        self.resume_from = resume if isinstance(resume, Path) else None
        self.ckpt = self._resumable(resume, free)
        self.device = pick_device(cfg.device)
        self.precision = resolve_precision(self.device, cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if self.ckpt is not None and "scaler" in self.ckpt:
            self.scaler.load_state_dict(self.ckpt["scaler"])

    def _resumable(self, resume: bool | Path, free) -> dict | None:
        """The checkpoint this launch goes on from (resume: True for OUT/last.pt, or a checkpoint file): refused
        when settings that change the numbers differ."""
        last = self.out / "last.pt"
        if isinstance(resume, Path):
            if last.exists() and resume.resolve().parent != self.out.resolve():
                raise ConfigError(
                    f"--resume {resume}: {self.out} holds another run; resume one of its own checkpoints or "
                    "choose another --out"
                )
            last = resume
        elif not last.exists():
            return None
        elif not resume:
            what = "fine-tuning run" if self.kind == FINETUNE_KIND else "run"
            raise ConfigError(
                f"{self.out}: holds a {what}; pass --resume auto to continue it or choose another --out"
            )
        ckpt = load_checkpoint(last, kind=self.kind)
        if later := [p.name for p in sorted(self.out.glob("ckpt-*.pt")) if int(p.stem[5:]) > ckpt["step"]]:
            raise ConfigError(
                f"--resume {last}: {self.out} holds checkpoints past its step {ckpt['step']} ({later[-1]}); move "
                "them out of the run folder to go back to that step"
            )
        if diff := settings_diff(ckpt["config"], asdict(self.cfg), free):
            raise ConfigError(
                f"{last}: the run was trained with other settings ({diff}); resume with the same flags"
            )
        check_split(str(last), ckpt["config"], ckpt.get("world", self.world), self.cfg, self.world)
        return ckpt

    def say(self, line: str) -> None:
        """The one line a run prints before its first step (rank 0, unless quiet)."""
        if self.progress:
            print(line)

    def start(self) -> None:
        """Make the run folder (only once every check passed: a refused run leaves nothing behind); rank 0
        removes the temporary files a killed run left (never valid)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            for tmp in self.out.glob(".*.tmp-*"):
                tmp.unlink()
            if self.resume_from is not None and self.resume_from.resolve().parent == self.out.resolve():
                point_last(self.out, self.resume_from)  # a run killed before its next save resumes from here

    def autocast(self):
        return autocast(self.device, self.precision)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the steps run: under torchrun, in DDP (gradients all-reduced once per optimizer step)."""
        if self.world == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def accumulate(self, model: nn.Module, micro_batches: Iterable, forward: Callable) -> list:
        """Backpropagate the mean loss of `micro_batches` (one optimizer step's): `forward(batch, i)` returns
        (loss, anything); the gradients all-reduce only after the last one. Returns the forwards' outputs,
        detached."""
        batches = list(micro_batches)
        outs = []
        for i, batch in enumerate(batches):
            last = self.world == 1 or i == len(batches) - 1
            with nullcontext() if last else model.no_sync():
                with self.autocast():
                    loss, extra = forward(batch, i)
                self.scaler.scale(loss / len(batches)).backward()
            outs.append((loss.detach(), extra))
        return outs

    def optimizer_step(self, opt: torch.optim.Optimizer, params, clip: float | None) -> torch.Tensor | None:
        """Unscale (fp16), clip the gradient norm to `clip` (None: no clipping), step, clear. Returns the norm
        before clipping (None without clipping)."""
        self.scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(params, clip) if clip is not None else None
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        return norm

    def agree(self, values: list[torch.Tensor], stop: StopSignal) -> tuple[list[float], bool]:
        """`values` (0-d tensors on the device, one dtype) summed over the ranks, and whether any rank got a
        SIGTERM: one all-reduce, so every rank takes the same NaN and stop verdicts."""
        dtype = values[0].dtype if values else torch.float32
        signalled = torch.tensor(float(stop.signum is not None), device=self.device, dtype=dtype)
        sums = torch.stack([*values, signalled])
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        *out, stopping = sums.tolist()
        return out, stopping > 0

    def save(self, state: dict, step: int, keep: int) -> Path:
        """Rank 0 writes the checkpoint of `step` (ckpt-SSSSSSSS.pt, the newest `keep` kept) and moves
        last.pt to it; `world` is recorded, so that a resume may split the global batch another way."""
        return save_checkpoint(self.out, {**state, "world": self.world, "step": step}, keep, self.kind)

    def stopped(self, stop: StopSignal, where: str) -> Stopped:
        """After the checkpoint made on a SIGTERM: every rank waits for it; the Stopped to raise."""
        self.barrier()
        return stop.checkpointed(where, self.out / "last.pt")
