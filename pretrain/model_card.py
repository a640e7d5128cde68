"""The README.md model card of an exported model folder: what the model is, the tokenizer and data it was
pre-trained on, the recipe, and the figures measured in its run folder (the last epoch's loss, and the
k-NN / linear-probe / fine-tuning results written beside the checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.checkpoint import KIND
from tokenkit.tokenizer import describe

OBJECTIVES = {
    "mapet": "MaPeT (permuted prediction of visual tokens)",
    "beit": "BEiT (masked prediction of visual tokens)",
}
RESULTS = ("knn-*.json", "linprobe-*.json", "validate-*.json", "result.json")  # beside the checkpoint
RECIPE = ("epochs", "batch_size", "accum_steps", "lr", "min_lr", "warmup_epochs", "weight_decay", "layer_decay",
          "drop_path", "clip_grad", "image_size", "crop_scale", "label_smoothing", "seed")  # fmt: skip


def last_record(run: Path) -> dict:
    """The last line of RUN/metrics.jsonl ({} when there is none or it cannot be read)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def tokenizer_line(store: dict, tokens_path: str | None) -> str:
    """The tokenizer as the token store's manifest names it, else as the checkpoint recorded it (its id)."""
    base = f"id `{store['tokenizer_id'][:16]}`, K = {store['k']}, a {store['grid']} x {store['grid']} grid"
    try:
        manifest = json.loads((Path(tokens_path) / "manifest.json").read_text())
        return f"{describe(manifest['job']['tokenizer'])}; {base}"
    except (OSError, ValueError, KeyError, TypeError):
        return base


def results(run: Path) -> list[str]:
    """One line per evaluation result file beside the checkpoint."""
    out = []
    for pattern in RESULTS:
        for path in sorted(run.glob(pattern)):
            try:
                r = json.loads(path.read_text())
                top1 = 100 * float(r.get("top1", r.get("best_top1")))
            except (OSError, ValueError, TypeError):
                continue
            n = r.get("n_val", "?")
            out.append(f"| `{path.name}` | {r.get('eval', 'finetune')} | {top1:.2f}% | {n} |")
    return out


def model_card(ckpt: dict, checkpoint: Path, folder: Path) -> str:
    """The model card of `mapet export CHECKPOINT FOLDER` for a pre-training or fine-tuning checkpoint."""
    run, cfg, vit = Path(checkpoint).parent, ckpt["config"], ckpt["vit"]
    pretrained = ckpt["kind"] == KIND
    what = (
        f"A ViT encoder pre-trained with {OBJECTIVES[ckpt['objective']]} , predicting visual tokens (no classifier: its pooled features)"
        if pretrained
        else f"A ViT classifier fine-tuned on {ckpt['num_classes']} classes"
    )
    lines = [
        "---",
        "library_name: timm",
        f"tags: [timm, image-classification, vision-transformer, {'mapet' if pretrained else 'fine-tuned'}]",
        "---",
        f"# {folder.name}",
        "",
        f"{what}, exported by `mapet export` from `{checkpoint}` (epoch {ckpt['epoch']}, step {ckpt['step']}).",
        "",
        "```python",
        "import timm",
        f"model = timm.create_model('local-dir:{folder}', pretrained=True).eval()",
        "data = timm.data.resolve_data_config({}, model=model)  # mean, std, crop_pct, interpolation",
        "transform = timm.data.create_transform(**data)",
        "```",
        "",
        "## Model",
        "",
        f"ViT: width {vit['dim']}, depth {vit['depth']}, {vit['heads']} heads, patch {vit['patch_size']}, "
        f"{vit['image_size']} px input, LayerScale {vit['layer_scale']}; timm arguments in `config.json`.",
    ]
    if pretrained:
        lines += [
            "",
            "## Pre-training",
            "",
            f"- objective: {ckpt['objective']}",
            f"- tokenizer: {tokenizer_line(ckpt['store'], cfg.get('tokens'))}",
            f"- data: the token store `{cfg.get('tokens')}`",
        ]
    lines += ["", "## Recipe", "", *(f"- {k}: {cfg[k]}" for k in RECIPE if cfg.get(k) is not None)]
    last = last_record(run)
    table = results(run)
    if last or table:
        lines += ["", "## Measured", ""]
    if last:
        shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items())
        lines.append(f"- last logged record (metrics.jsonl): {', '.join(shown)}")
    if table:
        lines += ["", "| result file | evaluation | top-1 | images |", "|---|---|---|---|", *table]
    return "\n".join(lines) + "\n"
