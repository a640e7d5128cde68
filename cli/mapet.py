"""`mapet`: MaPeT / BEiT pre-training on a token store, evaluation and export.

mapet pretrain --tokens STORE --out RUN --model mapet_small --objective mapet|beit [--resume auto]
torchrun --nproc_per_node 8 -m cli.mapet pretrain ...
mapet knn | linprobe | finetune --checkpoint RUN/last.pt --train DIR --val DIR
mapet validate --checkpoint FT/last.pt --val DIR
mapet report RUN [RUN ...] --out DIR   # curves, results, McNemar verdicts, token maps
mapet import-official vit_standard_small_patch16_224_KCLIP.tar DIR   # released weights, judged alike
mapet export RUN/last.pt DIR   # a folder timm loads: timm.create_model('local-dir:DIR', pretrained=True)
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import click

from cli.runtime import (
    BLR,
    Dist,
    config_option,
    init_distributed,
    learning_rate,
    run_cli,
    version_option,
    warn,
    with_options,
)
from pretrain.checkpoint import FINETUNE_KIND, KIND, load_checkpoint
from pretrain.dashboards import parse_log_to
from pretrain.evaluate import (
    ProbeConfig,
    default_crop_pct,
    encoder_of,
    extract,
    knn_classify,
    labelled_pair,
    labelled_source,
    linear_probe,
    load_vit,
    majority_baseline,
    top1,
)
from pretrain.export import export as export_model
from pretrain.finetune import FinetuneConfig, classifier_of, validate_classifier
from pretrain.finetune import finetune as run_finetune
from pretrain.model_card import model_card
from pretrain.official import RULES as LAYOUTS
from pretrain.official import classifier_checkpoint, import_official
from pretrain.report import report as write_report
from pretrain.run import COMPILE_MODES
from pretrain.train import TrainConfig
from pretrain.train import pretrain as run_pretrain
from pretrain.vit import PRESETS
from tokenkit.device import PRECISIONS
from tokenkit.errors import MAX_BATCH, MAX_WORKERS, ConfigError, require, seed_check
from tokenkit.journal import atomic_write_json
from tokenkit.lock import OutputLock

EXISTING = click.Path(exists=True, path_type=Path)


def resume_option(folder: str):
    """--resume auto|no|CHECKPOINT for a job that checkpoints into FOLDER/last.pt."""
    return click.option(
        "--resume",
        default="no",
        show_default=True,
        callback=lambda ctx, param, v: resume_target(v),
        help=f"auto: continue {folder}/last.pt when it exists; a checkpoint file: continue from it (an earlier "
        f"ckpt-*.pt of {folder} goes back to its step).",
    )


def resume_target(value: str) -> bool | Path:
    """auto -> True, no -> False, anything else: the checkpoint file to continue from."""
    if value in ("auto", "no"):
        return value == "auto"
    if not Path(value).is_file():
        raise ConfigError(f"--resume {value}: pass auto, no or a checkpoint file")
    return Path(value)


GRAD_CHECKPOINTING = click.option(
    "--grad-checkpointing",
    is_flag=True,
    help="Recompute each block's activations in backward: far less memory, about a third more compute, "
    "same losses. May be switched on or off on resume.",
)

ACCUM_STEPS = click.option(
    "--accum-steps",
    type=int,
    default=TrainConfig.accum_steps,
    show_default=True,
    help="Micro-steps per optimizer step. With --batch-size and the ranks it may change on resume if the "
    "global batch (their product) stays.",
)

COMPILE = click.option(
    "--compile",
    type=click.Choice(COMPILE_MODES),
    is_flag=False,
    flag_value="default",
    default=None,
    help="torch.compile the training step, in this mode (--compile alone: default; reduce-overhead: CUDA "
    "graphs, for small per-GPU batches, one process without --accum-steps). May change on resume.",
)


LOG_TO = click.option(
    "--log-to",
    type=str,
    default=None,
    help="Mirror metrics.jsonl to dashboards: tensorboard (RUN/tensorboard), wandb, or both comma-separated "
    "(optional installs; docs/pipeline.md). May change on resume.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@version_option("mapet")
def cli():
    """MaPeT and BEiT pre-training of ViTs on cached visual tokens, and their evaluation."""


@cli.command()
@click.option(
    "--tokens",
    required=True,
    type=str,
    help="Token store written by 'tokenkit tokenize': a folder, or its URL (mirrored read-only, checked file by "
    "file against its manifest: docs/pipeline.md).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--model", type=click.Choice(list(PRESETS)), default=TrainConfig.model, show_default=True)
@click.option(
    "--objective", type=click.Choice(["mapet", "beit"]), default=TrainConfig.objective, show_default=True
)
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=TrainConfig.batch_size,
    show_default=True,
    help="Per rank and micro-step.",
)
@ACCUM_STEPS
@click.option(
    "--lr",
    type=float,
    default=TrainConfig.lr,
    show_default=True,
    help=f"Peak learning rate (the paper's, for a global batch of {TrainConfig.LR_BATCH}).",
)
@BLR
@click.option("--min-lr", type=float, default=TrainConfig.min_lr, show_default=True)
@click.option("--warmup-epochs", type=float, default=TrainConfig.warmup_epochs, show_default=True)
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True)
@click.option("--clip-grad", type=float, default=TrainConfig.clip_grad, show_default=True)
@click.option("--drop-path", type=float, default=TrainConfig.drop_path, show_default=True)
@click.option("--image-size", type=int, default=None, help="Student input size (default: the preset's).")
@click.option("--patch-size", type=int, default=None, help="Student patch size (default: the preset's).")
@click.option("--num-context", type=int, default=None, help="MaPeT context tokens c (default CLS + 25%).")
@click.option(
    "--jitter",
    type=float,
    default=TrainConfig.jitter,
    show_default=True,
    help="Colour jitter on the input only.",
)
@click.option(
    "--data", type=click.Choice(["auto", "zarr", "wds"]), default=TrainConfig.data, show_default=True
)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--workers", type=int, default=TrainConfig.workers, show_default=True)
@click.option("--device", default=TrainConfig.device, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=TrainConfig.precision, show_default=True)
@COMPILE
@click.option(
    "--attn-backend",
    type=click.Choice(["auto", "sdpa", "flex"]),
    default=TrainConfig.attn_backend,
    show_default=True,
    help="MaPeT's masked attention. auto: FlexAttention on CUDA, SDPA on the CPU and inside a --compile'd step "
    "(flex with --compile is refused: docs/benchmarks.md). May change on resume.",
)
@GRAD_CHECKPOINTING
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option(
    "--ckpt-every",
    type=int,
    default=TrainConfig.ckpt_every,
    show_default=True,
    help="Steps between checkpoints (0: per epoch).",
)
@click.option("--keep", type=int, default=TrainConfig.keep, show_default=True, help="Checkpoints kept.")
@click.option("--log-every", type=int, default=TrainConfig.log_every, show_default=True)
@click.option("--source-root", type=str, default=None, help="Image folder, when it moved since tokenize.")
@click.option(
    "--init-from",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Start from the weights of this pre-training checkpoint (same objective, ViT and K) with a new "
    "schedule: how to extend a finished run (docs/pipeline.md).",
)
@LOG_TO
@resume_option("RUN")
@config_option(TrainConfig)
@click.option("--quiet", is_flag=True)
@click.pass_context
def pretrain(ctx, tokens, out, resume, quiet, **kw):
    """Pre-train a ViT with the MaPeT (or BEiT) objective on the cached targets of a token store.

    On SIGTERM (preemption) it trains on to the next logged step, checkpoints it and exits 143."""
    dist = init_distributed()
    notes = learning_rate(ctx, kw, dist.world, TrainConfig.LR_BATCH)
    kw["log_to"] = parse_log_to(kw["log_to"])
    kw["device"] = dist.device(kw["device"])
    cfg = TrainConfig(tokens=str(tokens), out=str(out), **kw)
    cfg.validate()
    for note in notes:
        warn("mapet", note)
    with OutputLock(Path(out)) if dist.rank == 0 else nullcontext():  # one writer per run folder
        last = run_pretrain(cfg, resume, dist.rank, dist.world, dist.barrier, not quiet)
    if dist.rank == 0:
        click.echo(f"checkpoint: {last}")


RANDOM_PATCH_HELP = "Patch size of a random-init encoder (--checkpoint random); a file fixes its own."
CHECKPOINT_HELP = (
    "RUN/last.pt of 'mapet pretrain', a 'mapet export' folder, a .safetensors with timm ViT key names "
    "(another codebase's timm ViT), or 'random' (random init)."
)
CROP_PCT_HELP = (
    "Evaluation crop: Resize(S / crop-pct) + CenterCrop(S) [default: 0.875 below 384 px, 1.0 from 384 px]; "
    "1.0 keeps the whole central square."
)
LABELLED_HELP = (
    "Labelled images: a folder with class sub-folders, tar shards with .cls (one path or a brace pattern), "
    "or a token store."
)
IMAGE_SIZE_HELP = "Input size (default: the checkpoint's; another one resamples its position embeddings)."
encoder_options = with_options(
    [
        click.option(
            "--checkpoint",
            required=True,
            help=CHECKPOINT_HELP,
        ),
        click.option("--train", "train_dir", required=True, help=LABELLED_HELP),
        click.option("--val", "val_dir", required=True, help=LABELLED_HELP),
        click.option(
            "--model",
            type=click.Choice(list(PRESETS)),
            default="mapet_small",
            show_default=True,
            help="Preset of a random-init encoder (--checkpoint random).",
        ),
        click.option("--image-size", type=int, default=None, help=IMAGE_SIZE_HELP),
        click.option("--patch-size", type=int, default=None, help=RANDOM_PATCH_HELP),
        click.option("--crop-pct", type=float, default=None, help=CROP_PCT_HELP),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=int, default=64, show_default=True),
        click.option("--workers", type=int, default=2, show_default=True),
        click.option("--device", default="auto", show_default=True),
        click.option(
            "--result",
            "out_json",
            type=click.Path(path_type=Path),
            default=None,
            help="Result JSON (default: beside the checkpoint).",
        ),
        click.option("--quiet", is_flag=True),
    ]
)


def loader_checks(batch_size: int, workers: int, crop_pct: float | None) -> tuple:
    """require() entries of an evaluation's image loader."""
    return (
        ("--batch-size", batch_size, 1 <= batch_size <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
        ("--workers", workers, 0 <= workers <= MAX_WORKERS, f"in [0, {MAX_WORKERS}]"),
        ("--crop-pct", crop_pct, crop_pct is None or 0.05 <= crop_pct <= 1, "in [0.05, 1]"),
    )


def _setup(kw, *checks):
    """Validate (the loader settings and the evaluation's own `checks`), then the encoder, the labelled
    train / val sources and the device."""
    require(
        (*loader_checks(kw["batch_size"], kw["workers"], kw["crop_pct"]), seed_check(kw["seed"]), *checks)
    )
    device = Dist().device(kw["device"])
    enc = load_vit(kw["checkpoint"], kw["model"], kw["image_size"], kw["patch_size"], kw["seed"])
    kw["crop_pct"] = kw["crop_pct"] or default_crop_pct(enc.cfg.image_size)  # the one used, for the JSON
    return enc, *labelled_pair(kw["train_dir"], kw["val_dir"]), device


def _write_result(kw, name: str, enc, pool: str, ty, vy, pred, scores: dict) -> dict:
    """The evaluation's JSON (docs/formats.md): its scores, what they were measured on, and each val image's
    label and prediction (so two encoders' results can be compared image by image: evaluate.mcnemar),
    written to --out or beside the checkpoint as NAME-FOLDER.json."""
    res = {
        "eval": name,
        **scores,
        "pool": pool,
        "image_size": enc.cfg.image_size,
        "crop_pct": kw["crop_pct"],
        "majority_baseline": majority_baseline(ty, vy),
        "checkpoint": str(kw["checkpoint"]),
        "train": str(kw["train_dir"]),
        "val": str(kw["val_dir"]),
        "n_train": len(ty),
        "n_val": len(vy),
        "labels": vy.tolist(),  # in the val set's order
        "predictions": pred.tolist(),
    }
    path = kw["out_json"]
    if not path:
        base = Path(".") if kw["checkpoint"] == "random" else Path(kw["checkpoint"]).parent
        path = base / f"{name}-{Path(kw['train_dir']).resolve().parent.name}.json"
    atomic_write_json(path, res)
    return res


def _features(enc, src, pool, kw, device):
    return extract(enc, src, pool, kw["batch_size"], kw["workers"], device, not kw["quiet"], kw["crop_pct"])


@cli.command()
@encoder_options
@click.option("--k", type=int, default=20, show_default=True)
@click.option("--temperature", type=float, default=0.07, show_default=True)
@click.option("--pool", type=click.Choice(["avg", "cls", "both"]), default="avg", show_default=True)
def knn(k, temperature, pool, **kw):
    """Weighted k-NN top-1 on frozen features (cosine, DINO protocol)."""
    enc, train, val, device = _setup(
        kw,
        ("--k", k, 1 <= k <= 10**6, "in [1, 10^6]"),
        ("--temperature", temperature, 1e-4 <= temperature <= 1e4, "in [1e-4, 1e4]"),
    )
    tf, ty = _features(enc, train, pool, kw, device)
    vf, vy = _features(enc, val, pool, kw, device)
    k = min(k, len(ty))  # every training sample votes when there are fewer than k
    pred = knn_classify(tf, ty, vf, k, temperature, int(max(ty.max(), vy.max())) + 1, device=device)
    acc = top1(pred, vy)
    res = _write_result(kw, "knn", enc, pool, ty, vy, pred, {"top1": acc, "k": k, "temperature": temperature})
    click.echo(
        f"knn top-1: {100 * acc:.2f}%  (k={k}, T={temperature}, majority {100 * res['majority_baseline']:.2f}%)"
    )


@cli.command()
@encoder_options
@click.option(
    "--pool",
    type=click.Choice(["avg", "cls", "both"]),
    default="both",
    show_default=True,
    help="both: CLS and average-pooled patch tokens, concatenated.",
)
@click.option(
    "--l2",
    type=float,
    default=None,
    help="L2 penalty on the probe's weights (default: chosen from 1e-6 ... 1 on a held-out 20% of --train).",
)
@click.option("--max-iter", type=int, default=1000, show_default=True, help="L-BFGS iterations at most.")
def linprobe(pool, l2, max_iter, **kw):
    """Linear probe top-1 on frozen, standardised features."""
    enc, train, val, device = _setup(
        kw,
        ("--l2", l2, l2 is None or 0 <= l2 <= 1e6, "in [0, 1e6]"),
        ("--max-iter", max_iter, 1 <= max_iter <= 10**6, "in [1, 10^6]"),
    )
    tf, ty = _features(enc, train, pool, kw, device)
    vf, vy = _features(enc, val, pool, kw, device)
    scores = linear_probe(tf, ty, vf, vy, ProbeConfig(l2=l2, max_iter=max_iter, seed=kw["seed"]), device)
    res = _write_result(kw, "linprobe", enc, pool, ty, vy, scores.pop("pred"), scores)
    click.echo(
        f"linprobe top-1: {100 * res['top1']:.2f}%  (train {100 * res['train_top1']:.2f}%, l2 {res['l2']:g})"
    )


@cli.command()
@click.option("--checkpoint", required=True, help=CHECKPOINT_HELP)
@click.option("--train", "train_dir", required=True, help=LABELLED_HELP)
@click.option("--val", "val_dir", required=True, help=LABELLED_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Fine-tuning run folder.")
@click.option(
    "--model",
    type=click.Choice(list(PRESETS)),
    default="mapet_small",
    show_default=True,
    help="Preset of a random-init encoder (--checkpoint random).",
)
@click.option("--image-size", type=int, default=None, help=IMAGE_SIZE_HELP)
@click.option("--patch-size", type=int, default=None, help=RANDOM_PATCH_HELP)
@click.option("--epochs", type=int, default=FinetuneConfig.epochs, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=FinetuneConfig.batch_size,
    show_default=True,
    help="Per rank and micro-step.",
)
@ACCUM_STEPS
@click.option(
    "--lr",
    type=float,
    default=FinetuneConfig.lr,
    show_default=True,
    help=f"Peak learning rate (tuned for a global batch of {FinetuneConfig.LR_BATCH}).",
)
@BLR
@click.option(
    "--min-lr",
    type=float,
    default=FinetuneConfig.min_lr,
    show_default=True,
    help="The cosine schedule's floor.",
)
@click.option("--warmup-epochs", type=float, default=FinetuneConfig.warmup_epochs, show_default=True)
@click.option("--weight-decay", type=float, default=FinetuneConfig.weight_decay, show_default=True)
@click.option("--layer-decay", type=float, default=FinetuneConfig.layer_decay, show_default=True)
@click.option("--drop-path", type=float, default=FinetuneConfig.drop_path, show_default=True)
@click.option("--label-smoothing", type=float, default=FinetuneConfig.label_smoothing, show_default=True)
@click.option("--crop-pct", type=float, default=None, help=CROP_PCT_HELP)
@click.option(
    "--crop-scale",
    type=(float, float),
    default=FinetuneConfig.crop_scale,
    show_default=True,
    help="RandomResizedCrop's range of the crop's share of the image area (BEiT and timm: 0.08 1).",
)
@click.option("--randaug", is_flag=True, help="RandAugment, timm's rand-m9-mstd0.5.")
@click.option(
    "--reprob",
    type=float,
    default=FinetuneConfig.reprob,
    show_default=True,
    help="Random erasing probability (BEiT: 0.25).",
)
@click.option(
    "--mixup", type=float, default=FinetuneConfig.mixup, show_default=True, help="Mixup alpha (paper: 0.8)."
)
@click.option(
    "--cutmix",
    type=float,
    default=FinetuneConfig.cutmix,
    show_default=True,
    help="CutMix alpha (paper: 1.0).",
)
@click.option("--seed", type=int, default=FinetuneConfig.seed, show_default=True)
@click.option("--workers", type=int, default=FinetuneConfig.workers, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--precision", type=click.Choice(PRECISIONS), default=FinetuneConfig.precision, show_default=True
)
@click.option(
    "--clip-grad",
    type=float,
    default=FinetuneConfig.clip_grad,
    help="Cap on the gradient norm (default: none, as BEiT's and MAE's fine-tuning).",
)
@click.option("--keep", type=int, default=FinetuneConfig.keep, show_default=True, help="Checkpoints kept.")
@GRAD_CHECKPOINTING
@COMPILE
@LOG_TO
@resume_option("OUT")
@config_option(FinetuneConfig)
@click.option("--quiet", is_flag=True)
@click.pass_context
def finetune(ctx, checkpoint, train_dir, val_dir, out, model, image_size, patch_size, resume, quiet, **kw):
    """Fine-tune the encoder end to end (avg pooling + fc_norm, layer-wise lr decay); torchrun for DDP.

    On SIGTERM (preemption) it trains on to the next optimizer step (under torchrun: the next multiple of 10,
    where the ranks agree), checkpoints it and exits 143."""
    dist = init_distributed()
    notes = learning_rate(ctx, kw, dist.world, FinetuneConfig.LR_BATCH)
    kw["log_to"] = parse_log_to(kw["log_to"])
    kw["device"] = dist.device(kw["device"])
    cfg = FinetuneConfig(**kw)
    cfg.validate()  # before the encoder and the image lists are loaded
    for note in notes:
        warn("mapet", note)
    enc = load_vit(checkpoint, model, image_size, patch_size, kw["seed"])
    with OutputLock(Path(out)) if dist.rank == 0 else nullcontext():  # one writer per run folder
        res = run_finetune(
            enc,
            *labelled_pair(train_dir, val_dir),
            out,
            cfg,
            not quiet,
            resume,
            dist.rank,
            dist.world,
            dist.barrier,
        )
    if dist.rank == 0:
        click.echo(
            f"finetune top-1: {100 * res['top1']:.2f}% (best {100 * res['best_top1']:.2f}%)  -> {out}/result.json"
        )


@cli.command("validate")
@click.option(
    "--checkpoint",
    required=True,
    type=EXISTING,
    help="OUT/last.pt of 'mapet finetune', or a classifier folder ('mapet export', 'mapet import-official').",
)
@click.option("--val", "val_dir", required=True, help=LABELLED_HELP)
@click.option("--crop-pct", type=float, default=None, help=CROP_PCT_HELP)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--result",
    "out_json",
    type=click.Path(path_type=Path),
    default=None,
    help="Result JSON (default: validate-<val folder or shard name>.json beside the checkpoint).",
)
@click.option("--quiet", is_flag=True)
def validate_command(checkpoint, val_dir, crop_pct, batch_size, workers, device, out_json, quiet):
    """Top-1 / top-5 of a fine-tuned classifier on a labelled folder or store (no training)."""
    require(loader_checks(batch_size, workers, crop_pct))
    device = Dist().device(device)
    path = Path(checkpoint)
    ckpt = classifier_checkpoint(path) if path.is_dir() else load_checkpoint(path, kind=FINETUNE_KIND)
    res = validate_classifier(
        ckpt, labelled_source(val_dir), crop_pct, batch_size, workers, device, not quiet, str(checkpoint)
    )
    res.update({"eval": "validate", "checkpoint": str(checkpoint), "val": str(val_dir)})
    name = Path(val_dir).resolve().name.split("{")[0].removesuffix(".tar").rstrip("-_.") or "shards"
    out = out_json or Path(checkpoint).parent / f"validate-{name}.json"
    atomic_write_json(out, res)
    click.echo(
        f"validate top-1: {100 * res['top1']:.2f}%  top-5: {100 * res['top5']:.2f}%  ({res['n_val']} images)"
    )


@cli.command()
@click.argument("checkpoint", type=EXISTING)
@click.argument("out", type=click.Path(path_type=Path))
def export(checkpoint, out):
    """Write CHECKPOINT as the folder OUT that timm loads, timm.create_model("local-dir:OUT",
    pretrained=True): model.safetensors (timm ViT key names), config.json (architecture, model_args,
    pretrained_cfg) and a README.md model card. A pre-training run's encoder (no head, average pooling) or a
    fine-tuned classifier (fc_norm and its head). knn, linprobe and finetune read an encoder folder, validate
    a classifier folder."""
    ckpt = load_checkpoint(checkpoint, kind=(KIND, FINETUNE_KIND))
    size = ckpt["vit"]["image_size"]
    if ckpt["kind"] == KIND:
        model, crop_pct, classes = encoder_of(ckpt), default_crop_pct(size), None
    else:
        model, classes = classifier_of(ckpt), ckpt.get("classes")
        crop_pct = ckpt["config"].get("crop_pct") or default_crop_pct(size)
    export_model(model, out, model_card(ckpt, checkpoint, out), crop_pct, classes)
    click.echo(f"wrote {out}: timm.create_model('local-dir:{out}', pretrained=True)")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Report folder (report.md, PNGs)."
)
def report(runs, out):
    """One page about RUNS (pre-training and fine-tuning folders): curves from their metrics.jsonl, every
    evaluation result beside their checkpoints with McNemar verdicts between runs on the same images, and the
    codebook usage and token maps of the token stores they read."""
    click.echo(f"report: {write_report(list(runs), out)}")


@cli.command("import-official")
@click.argument("checkpoint", type=EXISTING)
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--layout",
    type=click.Choice(list(LAYOUTS)),
    default=None,
    help="The checkpoint's key names (default: read from them): mapet (aimagelab/MaPeT's released "
    "classifiers), beit (BEiT, BEiT v2), mae, timm.",
)
def import_official_command(checkpoint, out, layout):
    """Write a checkpoint released by another codebase as the model folder OUT ('mapet export' writes the
    same): timm loads it, knn / linprobe / finetune read an encoder, validate scores a classifier."""
    out, layout = import_official(checkpoint, out, layout)
    click.echo(f"wrote {out} ({layout} layout): timm.create_model('local-dir:{out}', pretrained=True)")


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, "mapet", argv, resume="--resume auto")


if __name__ == "__main__":
    sys.exit(main())
