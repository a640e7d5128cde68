"""`--log-to tensorboard,wandb`: the run's metrics mirrored to the dashboards people watch.

RUN/metrics.jsonl stays the record (a resume truncates it to its checkpoint, `mapet report` reads it); a
dashboard receives each record as it is written, on rank 0: TensorBoard event files in RUN/tensorboard (a
resumed run purges the events past its checkpoint's step, so the curve continues where the run does), and a
Weights & Biases run whose id is kept in RUN/wandb-id, so that a resume continues the same W&B run (set
WANDB_MODE=offline to write it locally, WANDB_PROJECT to name the project, as W&B reads them; W&B drops
steps it already holds).
Both are optional dependencies: `pip install tensorboard` / `pip install wandb`.
"""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

from tokenkit.errors import ConfigError
from tokenkit.journal import atomic_write_bytes

DASHBOARDS = ("tensorboard", "wandb")


def parse_log_to(value: str | None) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ("tensorboard", "wandb")."""
    names = tuple(dict.fromkeys(v.strip() for v in (value or "").split(",") if v.strip()))
    check_dashboards(names)
    return names


def check_dashboards(names) -> None:
    """Each name a dashboard, its package installed: checked with the settings, before any work."""
    if bad := [n for n in names if n not in DASHBOARDS]:
        raise ConfigError(f"--log-to {bad[0]}: not one of {', '.join(DASHBOARDS)} (comma-separated)")
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log-to {name}: install it first, pip install {module}")


class Dashboards:
    """The dashboards of one run; on ranks other than 0, and with none asked for, every call does nothing."""

    def __init__(self, names: tuple[str, ...], run: Path, config: dict, step: int, rank: int):
        self.tb = self.wb = None
        if rank != 0:
            return
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--log-to tensorboard: install it first, pip install tensorboard") from e
            self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=step or None)
        if "wandb" in names:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--log-to wandb: install it first, pip install wandb") from e
            try:  # the project: W&B's own WANDB_PROJECT, else its default
                self.wb = wandb.init(name=run.name, id=wandb_id(run), resume="allow",
                                     dir=str(run), config=config)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - wandb raises its own kinds (no API key, no network, ...)
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                raise ConfigError(
                    f"--log-to wandb: W&B did not start ({why}); log in, or set WANDB_MODE=offline"
                ) from e

    def log(self, record: dict, step: int, prefix: str) -> None:
        """The record's numbers, as PREFIX/NAME at `step` (the step and epoch themselves are the x axis)."""
        numbers = {f"{prefix}/{k}": float(v) for k, v in record.items()
                   if isinstance(v, int | float) and k not in ("step", "epoch")}  # fmt: skip
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
        self.tb = self.wb = None


def wandb_id(run: Path) -> str:
    """The W&B run id of this run folder: made once, kept in RUN/wandb-id."""
    path = run / "wandb-id"
    if path.is_file():
        return path.read_text().strip()
    rid = secrets.token_hex(4)
    atomic_write_bytes(path, (rid + "\n").encode())
    return rid
