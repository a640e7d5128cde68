"""`mapet`: MaPeT / BEiT pre-training on a token store, evaluation and export.

mapet pretrain --tokens STORE --out RUN --model mapet_small --objective mapet|beit [--resume auto]
torchrun --nproc_per_node 8 -m cli.mapet pretrain ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.runtime import init_distributed, run_cli
from pretrain.train import TrainConfig
from pretrain.train import pretrain as run_pretrain
from pretrain.vit import PRESETS

EXISTING = click.Path(exists=True, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """MaPeT and BEiT pre-training of ViTs on cached visual tokens, and their evaluation."""


@cli.command()
@click.option("--tokens", required=True, type=EXISTING, help="Token store written by 'tokenkit tokenize'.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--model", type=click.Choice(list(PRESETS)), default="mapet_small", show_default=True)
@click.option("--objective", type=click.Choice(["mapet", "beit"]), default="mapet", show_default=True)
@click.option("--epochs", type=int, default=300, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True, help="Per rank and micro-step.")
@click.option("--accum-steps", type=int, default=1, show_default=True, help="Micro-steps per optimizer step.")
@click.option("--lr", type=float, default=1.5e-3, show_default=True)
@click.option("--min-lr", type=float, default=1e-5, show_default=True)
@click.option("--warmup-epochs", type=float, default=10.0, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--clip-grad", type=float, default=3.0, show_default=True)
@click.option("--drop-path", type=float, default=0.1, show_default=True)
@click.option("--image-size", type=int, default=None, help="Student input size (default: the preset's).")
@click.option("--patch-size", type=int, default=None)
@click.option("--num-context", type=int, default=None, help="MaPeT context tokens c (default CLS + 25%).")
@click.option("--jitter", type=float, default=0.4, show_default=True, help="Colour jitter on the input only.")
@click.option("--data", type=click.Choice(["auto", "zarr", "wds"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True
)
@click.option("--compile", is_flag=True, help="torch.compile the model.")
@click.option(
    "--attn-backend", type=click.Choice(["auto", "sdpa", "flex"]), default="auto", show_default=True
)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option(
    "--ckpt-every", type=int, default=0, show_default=True, help="Steps between checkpoints (0: per epoch)."
)
@click.option("--keep", type=int, default=2, show_default=True, help="Checkpoints kept.")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--source-root", type=str, default=None, help="Image folder, when it moved since tokenize.")
@click.option(
    "--resume",
    type=click.Choice(["auto", "no"]),
    default="no",
    show_default=True,
    help="auto: continue RUN/last.pt when it exists.",
)
@click.option("--quiet", is_flag=True)
def pretrain(tokens, out, resume, quiet, **kw):
    """Pre-train a ViT with the MaPeT (or BEiT) objective on the cached targets of a token store."""
    dist = init_distributed()
    kw["device"] = dist.device(kw["device"])
    cfg = TrainConfig(tokens=str(tokens), out=str(out), **kw)
    last = run_pretrain(cfg, resume == "auto", dist.rank, dist.world, dist.barrier, not quiet)
    if dist.rank == 0:
        click.echo(f"checkpoint: {last}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, "mapet", argv)


if __name__ == "__main__":
    sys.exit(main())
