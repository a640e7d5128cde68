"""What the CLIs share: torchrun rank discovery and turning library errors into one-line exits.

Only the CLI reads the environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK); library functions get
rank, world and a barrier as arguments.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from tokenkit.device import pick_device
from tokenkit.errors import ConfigError, TokenkitError, require
from tokenkit.remote import use_cache_dir
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
    use_cache_dir(os.environ.get("TOKENKIT_SHARD_CACHE"))  # where URLs' shards are kept (tokenkit.remote)
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


def warn(prog: str, message: str) -> None:
    """One warning line on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{prog}: warning: {message}", err=True)


def read_config_file(path: Path) -> dict:
    """A YAML or JSON mapping of option names (dashes or underscores) to values."""
    import yaml  # a dependency; imported here, where it is used

    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--config {path}: not a readable JSON / YAML file ({why})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: holds no mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def learning_rate(ctx: click.Context, kw: dict, world: int, lr_batch: int) -> list[str]:
    """Resolve --blr into kw["lr"] (blr x global batch / 256, MAE's and BEiT's rule). Returns the warnings to
    print once the settings are checked: the default lr meeting a global batch other than the `lr_batch` it
    was tuned for, warmup not shorter than the run."""
    batch = kw["batch_size"] * kw["accum_steps"] * world
    source = ctx.get_parameter_source("lr")
    given = source in (ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP)
    blr, warnings = kw.pop("blr"), []
    if blr is not None:  # --blr wins over an lr from a --config file, not over an --lr flag
        require((("--blr", blr, 1e-12 <= blr <= 10, "in [1e-12, 10]"),))
        if source == ParameterSource.COMMANDLINE:
            raise ConfigError("--blr with --lr: pass one of them")
        kw["lr"] = blr * batch / 256
    elif not given and batch != lr_batch:
        warnings.append(f"--lr {kw['lr']:g} is tuned for a global batch of {lr_batch}, this run's is {batch}; pass "
                        f"--blr {kw['lr'] * 256 / lr_batch:g} to scale it (lr = blr x batch / 256) or --lr to keep it")  # fmt: skip
    if kw["warmup_epochs"] >= kw["epochs"]:
        warnings.append(f"--warmup-epochs {kw['warmup_epochs']:g} is not shorter than --epochs {kw['epochs']}: "
                        "the learning rate never reaches its peak")  # fmt: skip
    return warnings


BLR = click.option(
    "--blr",
    type=float,
    default=None,
    help="Base learning rate per 256 images: lr = blr x global batch / 256 (instead of --lr).",
)


def config_option(config_cls):
    """--config FILE: the command's option values from a YAML or JSON file, a run's own config.json
    included; flags given on the command line override it. A key that is no option of the command is refused,
    unless it is a field of `config_cls` holding its default (a config.json records every field)."""
    defaults = {f.name: f.default for f in fields(config_cls)}

    def load(ctx: click.Context, param, value):
        if value is None:
            return None
        data = read_config_file(value)
        names = {p.name for p in ctx.command.params}
        if bad := [k for k in data if k not in names and not (k in defaults and _same(data[k], defaults[k]))]:
            raise ConfigError(f"--config {value}: {bad[0]} is not an option of this command")
        params = {p.name: p for p in ctx.command.params}
        given = {k: _as_option(v, params[k]) for k, v in data.items() if k in params}
        ctx.default_map = {**(ctx.default_map or {}), **given}
        return value

    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        is_eager=True,
        expose_value=False,
        callback=load,
        help="YAML or JSON file of option values (a run's config.json too); flags override it.",
    )


def _as_option(value, param: click.Parameter):
    """A config file's value as its option takes it: a list for a one-value option (a recorded --log-to) is
    its comma-separated spelling; a device cuda:N is auto (each rank's own GPU)."""
    if isinstance(value, list) and param.nargs == 1 and not getattr(param, "multiple", False):
        return ",".join(str(v) for v in value)
    if param.name == "device" and str(value).startswith("cuda:"):
        return "auto"  # a run's config.json records rank 0's GPU; each rank of a new launch takes its own
    return value


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, list | tuple) and isinstance(b, list | tuple) else a == b


def version_option(prog: str):
    """--version: the installed package's version, under the command's name."""
    return click.version_option(package_name="tokenkit-mapet", prog_name=prog, message="%(prog)s %(version)s")
