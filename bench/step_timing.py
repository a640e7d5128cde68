"""The timed training step shared by bench/mapet_step.py and bench/official_step.py, so both measure alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_train_steps(
    step_loss: Callable, params, opt, make_batch: Callable, device: torch.device, iters: int, warmup: int
) -> tuple[float, float]:
    """Median seconds of one full step and peak GiB allocated (NaN off CUDA).

    make_batch() is the data loader's work (untimed); the timed step is step_loss(batch) (which moves the
    batch to the device and returns the loss) under bf16 autocast on CUDA / fp32 elsewhere, backward,
    gradient clipping at 3.0, AdamW step.
    """
    cuda = device.type == "cuda"
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    params = list(params)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        batch = make_batch()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with ac:
            loss = step_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak
