"""Timed training steps, run in turn so that every model sees the same machine (bench/mapet_step.py).

A TrainStep is one model's full step: the data loader's work (untimed), then the timed part: forward and
loss under bf16 autocast on CUDA / fp32 elsewhere, backward, gradient clipping at 3.0, AdamW. `interleave`
runs one step of every model per iteration, so a machine whose speed drifts (this project's CPU machines
drift by ±15% within minutes) affects every model alike and per-iteration ratios cancel the drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class TrainStep:
    step_loss: Callable  # batch -> scalar loss (moves the batch to the device itself)
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    make_batch: Callable  # () -> batch: the data loader's work, not timed
    device: torch.device
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # largest (own resident state + step transient) seen, CUDA only
    calls: int = 0

    def __call__(self, record: bool = True) -> None:
        cuda = self.device.type == "cuda"
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        batch = self.make_batch()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        with ac:
            loss = self.step_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 3.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        self.calls += 1
        if record:
            self.times.append(dt)
        # The peak counts warm-up steps but the first (whose optimizer step allocates the state that
        # resident_bytes counts): with CUDA graphs (--compile reduce-overhead) a warm-up step records the
        # graphs, and only then does the allocator see their memory (allocated from the graphs' pool; a replay
        # allocates nothing). Other models' state is resident too: count only this model's own.
        if cuda and self.calls > 1:
            own = self.resident_bytes() + torch.cuda.max_memory_allocated() - before
            self.peak_bytes = max(self.peak_bytes, own)

    def resident_bytes(self) -> int:
        """Bytes this model keeps between steps: parameters and optimizer state (gradients are freed)."""
        state = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(
            t.numel() * t.element_size() for t in [*self.params, *state] if t.device.type == self.device.type
        )

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleave(steps: dict[str, TrainStep], iters: int, warmup: int) -> None:
    """warmup + iters iterations, each running one step of every model in turn (times kept after warmup)."""
    for i in range(warmup + iters):
        for step in steps.values():
            step(record=i >= warmup)


def ratio(steps: dict[str, TrainStep], a: str, b: str) -> float:
    """Median over iterations of step a's time / step b's time in the same iteration."""
    return statistics.median(x / y for x, y in zip(steps[a].times, steps[b].times, strict=True))


def step_flops(step_loss: Callable, batch) -> int:
    """Floating-point operations of one forward + backward (matrix products, attention, convolutions),
    counted by torch's FlopCounterMode. Attention runs as the math backend's explicit products so that it
    is counted too: every logit of the mask, masked ones included, as the dense kernels compute them."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step_loss(batch).backward()
    return counter.get_total_flops()
