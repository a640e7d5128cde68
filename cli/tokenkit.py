"""`tokenkit`: build visual tokenizers and the offline token cache.

tokenkit features IMAGES OUT --model RN50x64 --pretrained openai --image-size 448 --grid 14
tokenkit features IMAGES OUT --model timm:vit_base_patch14_dinov2.lvd142m --pretrained hub --grid 16
tokenkit features IMAGES OUT --model hog --grid 14
tokenkit codebook FEATURES OUT --k 8192 --niter 20 --nredo 5 --metric l2
tokenkit convert vqkd|dalle CHECKPOINT OUT.safetensors [--trust-pickle]
tokenkit tokenize IMAGES TOKENIZER OUT --views 8 --format both
tokenkit inspect STORE [--labels] [--json] | verify STORE | compare STORE_A STORE_B
tokenkit show STORE KEY --out tokens.png | show STORE --code K --out code-K.png
tokenkit encode TOKENIZER IMAGE [--out tokens.png]
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import click
import numpy as np

from cli.runtime import apply_preset, init_distributed, run_cli, version_option, warn, with_options
from tokenkit.codebook import Codebook, build_codebook, read_header
from tokenkit.device import PRECISIONS
from tokenkit.encoders import resolve_spec
from tokenkit.encoders.hog import CHANNELS, GRADIENTS, HOGConfig
from tokenkit.errors import MAX_SIDE, require
from tokenkit.features import FeaturesConfig, extract_features
from tokenkit.images import decode_image
from tokenkit.kmeans import KMeansConfig
from tokenkit.presets import PRESETS
from tokenkit.quality import compare as compare_stores
from tokenkit.quality import label_quality
from tokenkit.quantizer import Quantizer
from tokenkit.quantizer import convert as convert_checkpoint
from tokenkit.render import code_gallery, save_sheet
from tokenkit.render import show as show_tokens
from tokenkit.store import TokenStore, verify_sources
from tokenkit.store import verify as verify_store
from tokenkit.tokenize_job import TokenizeConfig
from tokenkit.tokenize_job import tokenize as tokenize_images
from tokenkit.tokenizer import describe, identity_id, load_tokenizer
from tokenkit.views import ViewConfig, center_box

PATH = click.Path(path_type=Path)
EXISTING = click.Path(exists=True, path_type=Path)

PRESET_HELP = "A named recipe; flags given override it. " + "; ".join(
    f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
    for name, values in PRESETS.items()
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@version_option("tokenkit")
def cli():
    """Visual tokenizers (k-means over CLIP, timm or HOG features; VQ-KD; DALL-E) and the offline token cache."""


def job_options(config):
    """The options every sharded job (features, tokenize) shares, their defaults taken from its `config`."""
    return with_options(
        [
            click.option(
                "--shard-size",
                default=config.shard_size,
                show_default=True,
                help="Images per work shard / zarr shard.",
            ),
            click.option(
                "--batch-size",
                default=config.batch_size,
                show_default=True,
                help="Images per forward (each with its --views).",
            ),
            click.option(
                "--workers", default=config.workers, show_default=True, help="DataLoader decoding workers."
            ),
            click.option(
                "--device", default=config.device, show_default=True, help="auto | cpu | cuda | cuda:N."
            ),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default=config.precision,
                show_default=True,
                help="auto: bf16 on CUDA, fp32 elsewhere.",
            ),
            click.option(
                "--on-error",
                type=click.Choice(["skip", "raise"]),
                default=config.on_error,
                show_default=True,
                help="Bad images: skip and list them in the manifest, or stop.",
            ),
            click.option("--resume", is_flag=True, help="Continue an unfinished job in OUT."),
            click.option("--quiet", is_flag=True, help="No progress bar."),
        ]
    )


@cli.command()
@click.argument("images", type=str)
@click.argument("out", type=PATH)
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, help=PRESET_HELP)
@click.option(
    "--model",
    default="ViT-B-16",
    show_default=True,
    help="An open_clip model name, timm:NAME[.TAG] (a timm ViT backbone), hog, or pixels (no weights).",
)
@click.option(
    "--pretrained",
    default="none",
    show_default=True,
    help="open_clip: a tag (openai, ...), a checkpoint path, local-dir:PATH; timm: hub (timm downloads the "
    "tag's weights) or a checkpoint path; none: seeded random init.",
)
@click.option(
    "--image-size", type=int, default=None, help="Encoder input size; derived from --grid when omitted."
)
@click.option("--grid", type=int, default=14, show_default=True, help="Feature grid side G.")
@click.option(
    "--layer", type=int, default=-1, show_default=True, help="ViT block whose patch tokens are used."
)
@click.option(
    "--max-patches",
    type=int,
    default=FeaturesConfig.max_patches,
    show_default=True,
    help="Patch features kept in all.",
)
@click.option("--seed", type=int, default=FeaturesConfig.seed, show_default=True)
@click.option(
    "--hog-cell", type=int, default=HOGConfig.cell, show_default=True, help="HOG: pixels per cell side."
)
@click.option(
    "--hog-bins", type=int, default=HOGConfig.bins, show_default=True, help="HOG: orientation bins."
)
@click.option(
    "--hog-gradient",
    type=click.Choice(GRADIENTS),
    default=HOGConfig.gradient,
    show_default=True,
    help="HOG: sobel (MaskFeat) or central differences (Dalal & Triggs, scikit-image).",
)
@click.option(
    "--hog-channels",
    type=click.Choice(CHANNELS),
    default=HOGConfig.channels,
    show_default=True,
    help="HOG: a histogram per RGB channel (MaskFeat), or the strongest channel per pixel.",
)
@click.option(
    "--hog-window",
    type=int,
    default=HOGConfig.window,
    show_default=True,
    help="HOG: Gaussian window (0: off).",
)
@job_options(FeaturesConfig)
@click.pass_context
def features(ctx, images, out, preset, **kw):
    """Extract patch features of IMAGES (folder or tar shards) into the float16 zarr store OUT: CLIP
    (open_clip), a timm ViT, HOG, or pooled pixels.

    On SIGTERM (preemption) it commits the work shard in flight and exits 143; --resume continues."""
    kw = apply_preset(ctx, PRESETS, preset, kw)
    dist = init_distributed()
    hog_cfg = HOGConfig(
        cell=kw["hog_cell"],
        bins=kw["hog_bins"],
        gradient=kw["hog_gradient"],
        channels=kw["hog_channels"],
        window=kw["hog_window"],
    )
    spec = resolve_spec(
        kw["model"], kw["pretrained"], kw["grid"], kw["image_size"], kw["layer"], kw["seed"], hog_cfg
    )
    kw["device"] = dist.device(kw["device"])
    cfg = FeaturesConfig(**{f.name: kw[f.name] for f in fields(FeaturesConfig)})
    cfg.validate()
    if spec.family in ("clip", "timm") and spec.pretrained == "none":
        warn("tokenkit", f"--model {spec.model} with random weights (--pretrained none): its codes say little "
             "beyond colour; pass --pretrained openai, hub or a checkpoint for real features")  # fmt: skip
    extract_features(
        images, out, spec, cfg, kw["resume"], dist.rank, dist.world, dist.barrier, not kw["quiet"]
    )
    if dist.rank == 0:
        click.echo(f"features: {out}")


@cli.command()
@click.argument("features_store", metavar="FEATURES", type=EXISTING)
@click.argument("out", type=PATH)
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, help=PRESET_HELP)
@click.option("--k", type=int, default=KMeansConfig.k, show_default=True, help="Codebook size K.")
@click.option("--niter", type=int, default=KMeansConfig.niter, show_default=True)
@click.option(
    "--nredo",
    type=int,
    default=KMeansConfig.nredo,
    show_default=True,
    help="Restarts; the best objective is kept.",
)
@click.option(
    "--metric",
    type=click.Choice(["l2", "cosine"]),
    default=KMeansConfig.metric,
    show_default=True,
    help="cosine = spherical k-means.",
)
@click.option(
    "--max-points-per-centroid", type=int, default=KMeansConfig.max_points_per_centroid, show_default=True
)
@click.option("--seed", type=int, default=KMeansConfig.seed, show_default=True)
@click.option(
    "--backend",
    type=click.Choice(["auto", "faiss", "torch"]),
    default=KMeansConfig.backend,
    show_default=True,
)
@click.option("--resume", is_flag=True, help="Continue the unfinished fit kept in OUT.progress.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def codebook(ctx, features_store, out, preset, resume, quiet, **kw):
    """Fit the k-means codebook OUT (.safetensors) on a features store.

    Its progress is kept in OUT.progress until OUT is written; on SIGTERM (preemption) it stops at the end of
    the iteration in flight (faiss: restart) and exits 143; --resume continues to the uninterrupted result.
    Under torchrun (--backend torch) each GPU holds and assigns 1/N of the sample."""
    kw = apply_preset(ctx, PRESETS, preset, kw)
    cfg = KMeansConfig(**kw)
    dist = init_distributed()
    cb = build_codebook(
        features_store, out, cfg, None, not quiet, resume, dist.rank, dist.world, dist.barrier
    )
    if dist.rank > 0:
        return
    usage = sum(1 for s in cb.meta["sizes"] if s > 0)
    click.echo(
        f"codebook: {out}  K={cb.k} C={cb.dim} objective={cb.meta['objective']:.6g} "
        f"used={usage}/{cb.k} backend={cb.meta['backend']} sha256={cb.sha256[:16]}"
    )


@cli.command()
@click.argument("family", type=click.Choice(["vqkd", "dalle"]))
@click.argument("checkpoint", type=EXISTING)
@click.argument("out", type=PATH)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle CHECKPOINT when it is a pickled object (DALL-E's encoder.pkl is a pickled module). "
    "Unpickling runs code from the file: pass it only for a file from a source you trust. Never needed for "
    "VQ-KD, whose checkpoint is a plain state dict.",
)
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="dalle: the view side in px (default 112, BEiT's second view).",
)
def convert(family, checkpoint, out, trust_pickle, image_size):
    """Convert a public code-model checkpoint into a tokenizer file OUT (.safetensors) that `tokenize` takes.

    vqkd: BEiT v2's VQ-KD (e.g. vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth); dalle: the DALL-E
    dVAE's encoder.pkl, as BEiT uses it (112-px views, 14 x 14 tokens)."""
    require(
        (
            (
                "--image-size",
                image_size,
                image_size is None or (8 <= image_size <= MAX_SIDE and image_size % 8 == 0),
                f"a multiple of 8 in [8, {MAX_SIDE}]",
            ),
        )
    )
    q = convert_checkpoint(family, checkpoint, out, trust_pickle, image_size)
    click.echo(
        f"{family}: {out}  K={q.k} grid={q.grid}x{q.grid} at {q.image_size} px  sha256={q.sha256[:16]}"
    )


@cli.command()
@click.argument("images", type=str)
@click.argument("tokenizer_path", metavar="TOKENIZER", type=EXISTING)
@click.argument("out", type=PATH)
@click.option(
    "--views", type=int, default=ViewConfig.views, show_default=True, help="Stored views per image (V)."
)
@click.option(
    "--view",
    "view_mode",
    type=click.Choice(["center", "random"]),
    default=None,
    help="center: the paper's central square; random: RandomResizedCrop boxes. "
    "Default: center for --views 1, random otherwise.",
)
@click.option("--scale", type=(float, float), default=ViewConfig.scale, show_default=True)
@click.option("--ratio", type=(float, float), default=ViewConfig.ratio, show_default=True)
@click.option(
    "--flip", type=float, default=ViewConfig.flip, show_default=True, help="Probability of a mirrored view."
)
@click.option(
    "--seed",
    type=int,
    default=ViewConfig.seed,
    show_default=True,
    help="Seeds the views with each sample key.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["zarr", "wds", "both"]),
    default=TokenizeConfig.format,
    show_default=True,
)
@job_options(TokenizeConfig)
def tokenize(images, tokenizer_path, out, views, view_mode, scale, ratio, flip, seed, fmt, **kw):
    """Tokenize IMAGES with TOKENIZER (a codebook from `tokenkit codebook`, or a quantizer from `tokenkit
    convert`) into the token store OUT (zarr and/or webdataset shards).

    On SIGTERM (preemption) it commits the work shard in flight and exits 143; --resume continues."""
    dist = init_distributed()
    mode = view_mode or ("center" if views == 1 else "random")
    cfg = TokenizeConfig(
        views=ViewConfig(views=views, mode=mode, scale=scale, ratio=ratio, flip=flip, seed=seed),
        format=fmt,
        shard_size=kw["shard_size"],
        on_error=kw["on_error"],
        batch_size=kw["batch_size"],
        workers=kw["workers"],
        device=dist.device(kw["device"]),
        precision=kw["precision"],
    )
    tokenize_images(
        images, tokenizer_path, out, cfg, kw["resume"], dist.rank, dist.world, dist.barrier, not kw["quiet"]
    )
    if dist.rank == 0:
        st = TokenStore.open(out).stats()
        click.echo(
            f"tokens: {out}  images={st['images']} skipped={st['skipped']} views={st['views']} "
            f"used codes={st['codebook_usage']['used_codes']}/{st['k']}"
        )


def _usage_line(u: dict, k: int, what: str) -> str:
    return (
        f"usage       {u['used_codes']}/{k} codes used{what}, perplexity {u['perplexity']:.1f}, "
        f"largest cluster {100 * u['largest_cluster_share']:.2f}%"
    )


def _inspect_file(path: Path, as_json: bool) -> None:
    """A codebook's or a quantizer's summary."""
    if read_header(path).get("kind") == "quantizer":
        q = Quantizer.load(path)
        st = {**q.header(), "tokenizer": describe(q.identity()), "id": identity_id(q.identity())}
        if as_json:
            click.echo(json.dumps(st, indent=1))
            return
        click.echo(f"quantizer   {path} ({q.family}, id {st['id'][:16]})")
        click.echo(
            f"codes       K={q.k}, grid {q.grid}x{q.grid} from {q.image_size}-px views ({q.interpolation})"
        )
        click.echo(
            f"weights     sha256 {q.sha256[:16]}, converted from {q.source['file']} ({q.source['sha256'][:23]})"
        )
        return
    cb = Codebook.load(path)
    st = {**cb.stats(), "tokenizer": describe(cb.identity()), "id": identity_id(cb.identity())}
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    km = st["kmeans"]
    click.echo(f"codebook    {path} (id {st['id'][:16]}, centroids sha256 {st['sha256'][:16]})")
    click.echo(f"centroids   K={st['k']} x {st['dim']}: {st['tokenizer']}, grid {st['grid']}x{st['grid']}")
    click.echo(
        f"k-means     {km['metric']}, {km['niter']} iterations x {km['nredo']} restarts on {st['n_train']} "
        f"features of {st['fitted_on']} ({st['backend']}), objective {st['objective']:.6g}"
    )
    click.echo(_usage_line(st["codebook_usage"], st["k"], " by the training sample"))


@cli.command()
@click.argument("store", metavar="STORE_OR_TOKENIZER", type=EXISTING)
@click.option(
    "--labels",
    is_flag=True,
    help="Also measure what the codes say about the images' labels: NMI, AMI and purity (reads every token).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(store, labels, as_json):
    """Summarise a token store (images, views, tokenizer, code usage, labels, shards), a codebook file (K,
    feature extractor, k-means settings and objective, code usage on its training sample) or a quantizer."""
    if store.is_file():
        _inspect_file(store, as_json)
        return
    ts = TokenStore.open(store)
    st = ts.stats()
    if labels:
        st["label_quality"] = label_quality(ts)
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    click.echo(f"store       {st['path']} (format v{st['format_version']}, {'+'.join(st['formats'])})")
    click.echo(f"images      {st['images']} stored, {st['skipped']} skipped of {st['source_images']}")
    click.echo(
        f"tokens      {st['views']} views x {st['grid']}x{st['grid']} {st['token_dtype']}, K={st['k']} "
        f"(tokenizer {st['tokenizer_id'][:16]})"
    )
    click.echo(f"tokenizer   {st['tokenizer']}")
    click.echo(_usage_line(st["codebook_usage"], st["k"], ""))
    click.echo(f"labels      {', '.join(f'{k}: {v}' for k, v in st['labels'].items()) or 'none'}")
    if labels:
        q = st["label_quality"]
        click.echo(
            f"codes/label NMI {q['nmi']:.4f}, AMI {q['ami']:.4f}, purity {100 * q['purity']:.1f}% (largest label "
            f"{100 * q['majority_label_share']:.1f}%), over {q['positions']} token positions"
        )
    click.echo(f"shards      {st['shards']}")


@cli.command()
@click.argument("store_a", type=EXISTING)
@click.argument("store_b", type=EXISTING)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare(store_a, store_b, as_json):
    """Compare two token stores of the same images and views (two tokenizers, or one run two ways): where
    their ids agree, and how much each one's codes say about the other's (NMI, AMI, majority purity)."""
    a, b = TokenStore.open(store_a), TokenStore.open(store_b)
    r = compare_stores(a, b)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    click.echo(f"A           {store_a}: {a.stats()['tokenizer']}, K={a.k}")
    click.echo(f"B           {store_b}: {b.stats()['tokenizer']}, K={b.k}")
    click.echo(f"positions   {r['positions']} (images x views x {a.grid}x{a.grid})")
    click.echo(f"agreement   {100 * r['agreement']:.2f}% of positions have the same id")
    click.echo(
        f"information NMI {r['nmi']:.4f}, AMI {r['ami']:.4f}, mutual information {r['mutual_information']:.4f} nats"
    )
    click.echo(
        f"purity      A's codes give B's by majority at {100 * r['purity_a_to_b']:.1f}% of positions, B's give A's "
        f"at {100 * r['purity_b_to_a']:.1f}%"
    )


@cli.command()
@click.argument("store", type=EXISTING)
@click.option(
    "--sources",
    is_flag=True,
    help="Also read every source image and check it is the one tokenized (crc32): what training reads.",
)
@click.option("--source-root", type=str, default=None, help="Image folder, when it moved since tokenize.")
@click.option("--quiet", is_flag=True)
def verify(store, sources, source_root, quiet):
    """Recompute every checksum and count; exit 1 naming the first problem."""
    problems = verify_store(store)
    if sources and not problems:
        problems = verify_sources(TokenStore.open(store), source_root, progress=not quiet)
    if problems:
        click.echo(f"tokenkit: verify failed: {problems[0]}", err=True)
        for p in problems[1:20]:
            click.echo(f"  also: {p}", err=True)
        if len(problems) > 20:
            click.echo(f"  ... {len(problems) - 20} more problems ({len(problems)} in all)", err=True)
        return 1
    click.echo(f"ok: {store}")
    return 0


@cli.command()
@click.argument("store", type=EXISTING)
@click.argument("key", required=False)
@click.option("--code", type=int, default=None, help="Instead of KEY: a gallery of patches given this code.")
@click.option("--limit", type=int, default=64, show_default=True, help="--code: patches at most.")
@click.option("--out", type=PATH, default=Path("tokens.png"), show_default=True)
@click.option(
    "--size", type=int, default=224, show_default=True, help="Rendered view size (--code: per patch, 64)."
)
@click.option("--source", type=str, default=None, help="Image folder, when it moved since tokenize.")
@click.pass_context
def show(ctx, store, key, code, limit, out, size, source):
    """Write a PNG of image KEY with its token map drawn over each stored view, or with --code K a gallery of
    the stored patches whose token is K (each framed in its surroundings). KEY is the stored key (the
    image's path in the source without its extension, dots as '_'), or that path as it is."""
    if (key is None) == (code is None):
        raise click.UsageError("pass a KEY or --code K (one of them)")
    require(
        (
            ("--size", size, 1 <= size <= 4096, "in [1, 4096]"),
            ("--limit", limit, 1 <= limit <= 10_000, "in [1, 10000]"),
        )
    )
    ts = TokenStore.open(store)
    if code is not None:
        if ctx.get_parameter_source("size") != click.core.ParameterSource.COMMANDLINE:
            size = 64
        path, n = code_gallery(ts, code, out, limit, size, source)
        click.echo(f"wrote {path} ({n} patches of code {code})")
        return
    click.echo(f"wrote {show_tokens(ts, key, out, size, source)}")


@cli.command()
@click.argument("tokenizer", type=EXISTING)
@click.argument("image", type=EXISTING)
@click.option("--out", type=PATH, default=None, help="Also write a PNG of the view and its token map.")
@click.option("--size", type=int, default=224, show_default=True, help="Rendered view size in the PNG.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16 on CUDA.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object (image, grid, tokens) instead of rows."
)
def encode(tokenizer, image, out, size, device, precision, as_json):
    """Print the tokens of IMAGE's central square under TOKENIZER (G rows of G ids), as 'tokenkit tokenize
    --view center' stores them; no token store needed."""
    require((("--size", size, 1 <= size <= 4096, "in [1, 4096]"),))
    tok = load_tokenizer(tokenizer, device, precision)
    img = decode_image(image.read_bytes(), str(image), min_side=tok.grid)
    ids = tok.encode_image(img).cpu().numpy()  # (G, G)
    if as_json:
        click.echo(json.dumps({"image": str(image), "grid": tok.grid, "tokens": ids.tolist()}))
    else:
        click.echo("\n".join(" ".join(str(t) for t in row) for row in ids))
    if out is not None:
        view = np.array([[*center_box(img.width, img.height), 0]])  # (1, 5)
        click.echo(f"wrote {save_sheet(img, view, ids[None], out, size)}", err=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, "tokenkit", argv)


if __name__ == "__main__":
    sys.exit(main())
