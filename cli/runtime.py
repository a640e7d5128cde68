"""What the CLIs share: torchrun rank discovery and turning library errors into one-line exits.

Only the CLI reads the environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK); library functions get
rank, world and a barrier as arguments.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import click
import torch

from tokenkit.device import pick_device
from tokenkit.errors import TokenkitError
from tokenkit.stopsignal import Stopped


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def device(self, device: str) -> str:
        """--device resolved and checked (tokenkit.device.pick_device): under torchrun, auto is this rank's
        GPU, cuda:LOCAL_RANK, when CUDA is present."""
        if device == "auto" and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return str(pick_device(device))


def init_distributed() -> Dist:
    """Join the torchrun process group when launched by torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


def run_cli(group: click.Group, prog: str, argv: list[str] | None, resume: str = "--resume") -> int:
    """Run a click group; library errors become `prog: error: ...` on stderr and exit status 2. resume: the
    flag that continues this CLI's jobs, named when a full disk stops one."""
    try:
        rv = group.main(args=argv, prog_name=prog, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:  # Ctrl-C: what was committed stays, the rest is redone on resume
        click.echo(f"{prog}: interrupted; run the same command with {resume} to continue", err=True)
        return 130
    except Stopped as e:  # preempted after making its work durable: the status of a process the signal ended
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"{prog}: {e}", err=True)
        return 128 + e.signum
    except TokenkitError as e:
        # raised again by a DataLoader worker, the message carries the worker's traceback: keep its own line
        msg = str(e).strip().splitlines()[-1].split(": ", 1)[-1] if "\n" in str(e) else str(e)
        click.echo(f"{prog}: error: {msg}", err=True)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            click.echo(
                f"{prog}: error: {e.filename or ''}: disk full; free space and re-run with {resume}", err=True
            )
            return 1
        if e.filename:  # a path the user gave or an output that cannot be written
            click.echo(f"{prog}: error: {e.filename}: {e.strerror or e}", err=True)
            return 1
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def apply_preset(ctx: click.Context, presets: dict, name: str | None, params: dict) -> dict:
    """Preset values for every option the user did not give on the command line."""
    if name is None:
        return params
    if name not in presets:
        raise click.BadParameter(
            f"unknown preset '{name}'; choose one of {', '.join(presets)}", param_hint="--preset"
        )
    out = dict(params)
    for k, v in presets[name].items():
        if k in out and ctx.get_parameter_source(k) != click.core.ParameterSource.COMMANDLINE:
            out[k] = v
    return out


def with_options(options: list):
    """One decorator applying a shared list of click options (first listed = first in --help)."""

    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply
