"""Jobs that die by SIGKILL at a chosen point, for the kill-and-resume tests.

A kill point is (hook, n): the n-th call of the hook kills the process. Hooks:
  write  atomic_write_bytes (job spec, progress records, tars, manifest, checkpoints): a torn temporary
         file is left behind, then SIGKILL
  shard  write_shard: only the first array of the shard is written, then SIGKILL
  batch  the n-th batch of images arrives, then SIGKILL (mid-computation)
  step   the n-th optimizer step is about to run, then SIGKILL
  ckpt   right after the n-th checkpoint is saved, SIGKILL
`count_hooks` runs a job with counters instead of kills, to know how many calls each hook gets.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import torch

import pretrain.checkpoint
import pretrain.run
import pretrain.train
import tokenkit.codebook
import tokenkit.features
import tokenkit.journal
import tokenkit.shardjob
import tokenkit.tokenize_job
import tokenkit.wds
from pretrain.train import TrainConfig
from pretrain.train import pretrain as run_pretrain
from tokenkit.encoders import resolve_spec
from tokenkit.features import FeaturesConfig, extract_features
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig

WRITERS = [tokenkit.journal, tokenkit.wds, tokenkit.codebook, pretrain.checkpoint, pretrain.train]
HOOKS = {
    "features": ("write", "shard", "batch"),
    "tokenize": ("write", "shard", "batch"),
    "pretrain": ("write", "step", "ckpt"),
}


def run_job(job: str, args: dict, resume: bool) -> None:
    if job == "features":
        spec = resolve_spec("tokenkit-tiny-vit", "none", grid=4)
        cfg = FeaturesConfig(max_patches=10_000, shard_size=2, workers=0, batch_size=2)
        extract_features(args["images"], args["out"], spec, cfg, resume=resume, progress=False)
    elif job == "tokenize":
        cfg = TokenizeConfig(
            views=ViewConfig(2, "random", seed=1), format="both", shard_size=3, workers=0, batch_size=2
        )
        tokenize(args["images"], args["codebook"], args["out"], cfg, resume=resume, progress=False)
    else:
        cfg = TrainConfig(
            tokens=str(args["tokens"]),
            out=str(args["out"]),
            model="mapet_micro",
            image_size=64,
            batch_size=4,
            epochs=3,
            warmup_epochs=1,
            lr=1e-3,
            workers=0,
            log_every=1,
            ckpt_every=2,
            objective=args.get("objective", "mapet"),
        )
        run_pretrain(cfg, resume=resume, progress=False)


def _install(hook: str, on_call) -> None:
    """Wrap the hook's function everywhere it is referenced; on_call(kind) runs before (or instead of) it."""
    if hook == "write":
        real = tokenkit.journal.atomic_write_bytes

        def write(path, data):
            on_call(
                lambda: (
                    Path(path)
                    .with_name(f".{Path(path).name}.tmp-{os.getpid()}")
                    .write_bytes(data[: len(data) // 2])
                )
            )
            real(path, data)

        for m in WRITERS:
            if hasattr(m, "atomic_write_bytes"):
                m.atomic_write_bytes = write
    elif hook == "shard":
        real_ws = tokenkit.tokenize_job.write_shard

        def shard(root, sid, start, data):
            first = next(iter(data))
            on_call(lambda: real_ws(root, sid, start, {first: data[first]}))
            return real_ws(root, sid, start, data)

        tokenkit.tokenize_job.write_shard = tokenkit.features.write_shard = shard
    elif hook == "batch":
        real_it = tokenkit.shardjob.iter_shard_batches

        def batches(*a, **k):
            for item in real_it(*a, **k):
                on_call(lambda: None)
                yield item

        tokenkit.shardjob.iter_shard_batches = batches
    elif hook == "step":
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            on_call(lambda: None)
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = step
    elif hook == "ckpt":
        real_ck = pretrain.run.save_checkpoint

        def ckpt(*a, **k):
            path = real_ck(*a, **k)
            on_call(lambda: None)
            return path

        pretrain.run.save_checkpoint = ckpt


def run_with_kill(job: str, args: dict, hook: str, n: int, resume: bool) -> None:
    """Child-process entry: run `job`, SIGKILL at the n-th call of `hook` (after its side effect)."""
    calls = [0]

    def on_call(side_effect):
        calls[0] += 1
        if calls[0] == n:
            side_effect()
            os.kill(os.getpid(), signal.SIGKILL)

    _install(hook, on_call)
    run_job(job, args, resume)


def count_hooks(job: str, args: dict) -> Counter:
    """Child-process entry for counting: returns how often each hook of `job` is called in a full run."""
    counts = Counter()
    for hook in HOOKS[job]:
        _install(hook, lambda _effect, h=hook: counts.update([h]))
    run_job(job, args, resume=False)
    return counts
