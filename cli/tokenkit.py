"""`tokenkit`: build k-CLIP codebooks and the offline token cache.

tokenkit features IMAGES OUT --model RN50x64 --pretrained openai --image-size 448 --grid 14
tokenkit codebook FEATURES OUT --k 8192 --niter 20 --nredo 5 --metric l2
tokenkit tokenize IMAGES CODEBOOK OUT --views 8 --format both
tokenkit inspect STORE [--json] | verify STORE | show STORE KEY --out tokens.png
tokenkit encode CODEBOOK IMAGE [--out tokens.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from cli.runtime import apply_preset, init_distributed, run_cli, with_options
from tokenkit.clip_encoder import resolve_spec
from tokenkit.codebook import Codebook, build_codebook
from tokenkit.errors import require
from tokenkit.features import FeaturesConfig, extract_features
from tokenkit.images import decode_image
from tokenkit.kmeans import KMeansConfig
from tokenkit.presets import PRESETS
from tokenkit.render import save_sheet
from tokenkit.render import show as show_tokens
from tokenkit.store import TokenStore, verify_sources
from tokenkit.store import verify as verify_store
from tokenkit.tokenize import TokenizeConfig
from tokenkit.tokenize import tokenize as tokenize_images
from tokenkit.tokenizer import Tokenizer
from tokenkit.views import ViewConfig, center_box

PATH = click.Path(path_type=Path)
EXISTING = click.Path(exists=True, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """k-CLIP visual tokenizers and the offline token cache."""


job_options = with_options(
    [
        click.option(
            "--shard-size", default=1024, show_default=True, help="Images per work shard / zarr shard."
        ),
        click.option("--batch-size", default=32, show_default=True, help="Images per CLIP forward."),
        click.option("--workers", default=4, show_default=True, help="DataLoader decoding workers."),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."),
        click.option(
            "--precision",
            default="auto",
            show_default=True,
            help="auto (bf16 on CUDA) | fp32 | bf16 | fp16.",
        ),
        click.option(
            "--on-error",
            type=click.Choice(["skip", "raise"]),
            default="skip",
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
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), default=None, help="A named recipe (mapet-kclip)."
)
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip model name.")
@click.option(
    "--pretrained",
    default="none",
    show_default=True,
    help="open_clip tag (openai, ...), checkpoint path, local-dir:PATH, or none (seeded random init).",
)
@click.option(
    "--image-size", type=int, default=None, help="Encoder input size; derived from --grid when omitted."
)
@click.option("--grid", type=int, default=14, show_default=True, help="Feature grid side G.")
@click.option(
    "--layer", type=int, default=-1, show_default=True, help="ViT block whose patch tokens are used."
)
@click.option(
    "--max-patches", type=int, default=4_194_304, show_default=True, help="Patch features kept in all."
)
@click.option("--seed", type=int, default=0, show_default=True)
@job_options
@click.pass_context
def features(ctx, images, out, preset, **kw):
    """Extract CLIP patch features of IMAGES (folder or tar shards) into the float16 zarr store OUT.

    On SIGTERM (preemption) it commits the work shard in flight and exits 143; --resume continues."""
    kw = apply_preset(ctx, PRESETS, preset, kw)
    dist = init_distributed()
    spec = resolve_spec(kw["model"], kw["pretrained"], kw["grid"], kw["image_size"], kw["layer"], kw["seed"])
    cfg = FeaturesConfig(
        max_patches=kw["max_patches"],
        shard_size=kw["shard_size"],
        seed=kw["seed"],
        on_error=kw["on_error"],
        batch_size=kw["batch_size"],
        workers=kw["workers"],
        device=dist.device(kw["device"]),
        precision=kw["precision"],
    )
    extract_features(
        images, out, spec, cfg, kw["resume"], dist.rank, dist.world, dist.barrier, not kw["quiet"]
    )
    if dist.rank == 0:
        click.echo(f"features: {out}")


@cli.command()
@click.argument("features_store", metavar="FEATURES", type=EXISTING)
@click.argument("out", type=PATH)
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None)
@click.option("--k", type=int, default=8192, show_default=True, help="Codebook size K.")
@click.option("--niter", type=int, default=20, show_default=True)
@click.option("--nredo", type=int, default=5, show_default=True, help="Restarts; the best objective is kept.")
@click.option(
    "--metric",
    type=click.Choice(["l2", "cosine"]),
    default="l2",
    show_default=True,
    help="cosine = spherical k-means.",
)
@click.option("--max-points-per-centroid", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the unfinished fit kept in OUT.progress.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def codebook(ctx, features_store, out, preset, resume, quiet, **kw):
    """Fit the k-CLIP codebook OUT (.safetensors) on a features store.

    Its progress is kept in OUT.progress until OUT is written; on SIGTERM (preemption) it stops at the end of
    the iteration in flight (faiss: restart) and exits 143; --resume continues to the uninterrupted result.
    Under torchrun (--backend torch) each GPU holds and assigns 1/N of the sample."""
    kw = apply_preset(ctx, PRESETS, preset, kw)
    cfg = KMeansConfig(
        k=kw["k"],
        niter=kw["niter"],
        nredo=kw["nredo"],
        metric=kw["metric"],
        max_points_per_centroid=kw["max_points_per_centroid"],
        seed=kw["seed"],
        backend=kw["backend"],
    )
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
@click.argument("images", type=str)
@click.argument("codebook_path", metavar="CODEBOOK", type=EXISTING)
@click.argument("out", type=PATH)
@click.option("--views", type=int, default=1, show_default=True, help="Stored views per image (V).")
@click.option(
    "--view",
    "view_mode",
    type=click.Choice(["center", "random"]),
    default=None,
    help="center: the paper's central square; random: RandomResizedCrop boxes. "
    "Default: center for --views 1, random otherwise.",
)
@click.option("--scale", type=(float, float), default=(0.2, 1.0), show_default=True)
@click.option("--ratio", type=(float, float), default=(0.75, 4 / 3), show_default=True)
@click.option("--flip", type=float, default=0.5, show_default=True, help="Probability of a mirrored view.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the views with each sample key.")
@click.option(
    "--format", "fmt", type=click.Choice(["zarr", "wds", "both"]), default="zarr", show_default=True
)
@job_options
def tokenize(images, codebook_path, out, views, view_mode, scale, ratio, flip, seed, fmt, **kw):
    """Tokenize IMAGES with CODEBOOK into the token store OUT (zarr and/or webdataset shards).

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
        images, codebook_path, out, cfg, kw["resume"], dist.rank, dist.world, dist.barrier, not kw["quiet"]
    )
    if dist.rank == 0:
        st = TokenStore.open(out).stats()
        click.echo(
            f"tokens: {out}  images={st['images']} skipped={st['skipped']} views={st['views']} "
            f"used codes={st['codebook_usage']['used_codes']}/{st['k']}"
        )


def _weights(weights_id: str) -> str:
    """The encoder's weights as inspect prints them: a random init says so (its tokens mean nothing)."""
    if weights_id.startswith("none:seed="):
        return f"random-init weights (seed {weights_id.removeprefix('none:seed=')})"
    if weights_id.startswith("sha256:"):
        return f"weights {weights_id[: len('sha256:') + 16]}"
    return f"{weights_id} weights"


@cli.command()
@click.argument("store", metavar="STORE_OR_CODEBOOK", type=EXISTING)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(store, as_json):
    """Summarise a token store (images, views, K, codebook usage, labels, shards) or a codebook file (K,
    encoder, k-means settings, objective, code usage on its training sample)."""
    st = Codebook.load(store).stats() if store.is_file() else TokenStore.open(store).stats()
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    u = st["codebook_usage"]
    if store.is_file():
        km = st["kmeans"]
        click.echo(f"codebook    {store} (sha256 {st['sha256'][:16]})")
        click.echo(
            f"centroids   K={st['k']} x {st['dim']} from {st['encoder']} ({_weights(st['weights'])}, layer "
            f"{st['layer']}, {st['image_size']} px, grid {st['grid']}x{st['grid']})"
        )
        click.echo(
            f"k-means     {km['metric']}, {km['niter']} iterations x {km['nredo']} restarts on {st['n_train']} "
            f"features of {st['fitted_on']} ({st['backend']}), objective {st['objective']:.6g}"
        )
        click.echo(
            f"usage       {u['used_codes']}/{st['k']} codes used by the training sample, perplexity "
            f"{u['perplexity']:.1f}, largest cluster {100 * u['largest_cluster_share']:.2f}%"
        )
        return
    click.echo(f"store       {st['path']} (format v{st['format_version']}, {'+'.join(st['formats'])})")
    click.echo(f"images      {st['images']} stored, {st['skipped']} skipped of {st['source_images']}")
    click.echo(
        f"tokens      {st['views']} views x {st['grid']}x{st['grid']} {st['token_dtype']}, "
        f"K={st['k']} ({st['encoder']}, {_weights(st['weights'])}, codebook {st['codebook_sha256'][:16]})"
    )
    click.echo(
        f"usage       {u['used_codes']}/{st['k']} codes used, perplexity {u['perplexity']:.1f}, "
        f"largest cluster {100 * u['largest_cluster_share']:.2f}%"
    )
    click.echo(f"labels      {', '.join(f'{k}: {v}' for k, v in st['labels'].items()) or 'none'}")
    click.echo(f"shards      {st['shards']}")


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
@click.argument("key")
@click.option("--out", type=PATH, default=Path("tokens.png"), show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="Rendered view size in pixels.")
@click.option("--source", type=str, default=None, help="Image folder, when it moved since tokenize.")
def show(store, key, out, size, source):
    """Write a PNG of image KEY with its token map drawn over each stored view. KEY is the stored key
    (the image's path in the source without its extension, dots as '_'), or that path as it is."""
    require((("--size", size, size >= 1, ">= 1"),))
    path = show_tokens(TokenStore.open(store), key, out, size, source)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("codebook", type=EXISTING)
@click.argument("image", type=EXISTING)
@click.option("--out", type=PATH, default=None, help="Also write a PNG of the view and its token map.")
@click.option("--size", type=int, default=224, show_default=True, help="Rendered view size in the PNG.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option(
    "--precision", default="auto", show_default=True, help="auto (bf16 on CUDA) | fp32 | bf16 | fp16."
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object (image, grid, tokens) instead of rows."
)
def encode(codebook, image, out, size, device, precision, as_json):
    """Print the tokens of IMAGE's central square under CODEBOOK (G rows of G ids), as 'tokenkit tokenize
    --view center' stores them; no token store needed."""
    require((("--size", size, size >= 1, ">= 1"),))
    tok = Tokenizer.load(codebook, device, precision)
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
