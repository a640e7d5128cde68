"""Where a job runs and at what precision: the one resolver every job of both packages uses (features,
tokenize, encode, pre-training, fine-tuning, evaluation)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tokenkit.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(device: str | torch.device) -> torch.device:
    """--device resolved: auto is CUDA when present, else the CPU; a CUDA device this machine lacks is one
    line naming the fix."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device}: not a device; pass auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices; pass cpu or auto"
        )
    return dev


def resolve_precision(device: torch.device, precision: str) -> str:
    """--precision as it runs: auto is bf16 on CUDA, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast of `precision` on `device` (resolve_precision's): bf16 / fp16, or none for fp32."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
