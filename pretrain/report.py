"""`mapet report RUN [RUN ...] --out DIR`: one page about any set of runs.

DIR/report.md holds the pre-training curves (loss and token top-1 against predicting from the codes'
frequencies alone), the fine-tuning curves (validation top-1 per epoch), every evaluation result written
beside the runs' checkpoints (k-NN, linear probe, `mapet validate`, a fine-tuning's result.json), McNemar
verdicts between runs evaluated on the same images, and the codebook usage and token maps of each token store
the pre-training runs read. The figures are PNGs beside it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.evaluate import mcnemar
from tokenkit.errors import ConfigError, ImageError, SourceError, StoreError
from tokenkit.journal import atomic_write_bytes
from tokenkit.render import token_overlay
from tokenkit.store import TokenStore
from tokenkit.tokenizer import describe
from tokenkit.views import render_view

RESULTS = ("knn-*.json", "linprobe-*.json", "validate-*.json", "result.json")  # beside a checkpoint


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("mapet report draws with matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none; a line a running run is writing is left out)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def frequency_baseline(usage: dict) -> tuple[float, float]:
    """(cross-entropy in nats, top-1) of predicting every token from the codes' frequencies alone: log of the
    perplexity, and the largest cluster's share. What a pre-training that learned nothing would reach."""
    return float(np.log(usage["perplexity"])), float(usage["largest_cluster_share"])


def last_epoch(m: list[dict]) -> tuple[float, float]:
    """Mean loss and token top-1 over the logged steps of a pre-training's last epoch (single steps are noisy)."""
    last = [r for r in m if r["epoch"] == m[-1]["epoch"]]
    return float(np.mean([r["loss"] for r in last])), float(np.mean([r["token_acc"] for r in last]))


def pretrain_curves(runs: dict[str, list[dict]], out: Path, baseline: tuple[float, float] | None) -> None:
    """Loss and token top-1 against the step, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, m in runs.items():
        steps = [r["step"] for r in m]
        axes[0].plot(steps, [r["loss"] for r in m], label=name)
        axes[1].plot(steps, [100 * r["token_acc"] for r in m], label=name)
    if baseline is not None:
        axes[0].axhline(baseline[0], color="gray", linestyle="--", label="code frequencies alone")
        axes[1].axhline(100 * baseline[1], color="gray", linestyle="--", label="code frequencies alone")
    axes[0].set(xlabel="step", ylabel="cross-entropy", title="pre-training loss")
    axes[1].set(xlabel="step", ylabel="token top-1 (%)", title="token accuracy on predicted patches")
    _save(fig, axes, out)


def finetune_curves(runs: dict[str, list[dict]], out: Path) -> None:
    """Training loss and validation top-1 against the epoch, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, m in runs.items():
        epochs = [r["epoch"] for r in m]
        axes[0].plot(epochs, [r["loss"] for r in m], label=name)
        axes[1].plot(epochs, [100 * r["val_top1"] for r in m], label=name)
    axes[0].set(xlabel="epoch", ylabel="loss", title="fine-tuning loss")
    axes[1].set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
    _save(fig, axes, out)


def _save(fig, axes, out: Path) -> None:
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _plt().close(fig)


def usage_plot(store: TokenStore, out: Path) -> dict:
    """The codes' shares of the store's tokens, sorted; returns the store's codebook usage."""
    plt = _plt()
    counts = np.sort(np.asarray(store.manifest["code_counts"]))[::-1]
    st = store.stats()["codebook_usage"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(np.arange(len(counts)), counts / counts.sum() * 100, width=1.0)
    ax.set(xlabel="code (sorted by frequency)", ylabel="share of tokens (%)",
           title=f"codebook usage: {st['used_codes']}/{len(counts)} used, perplexity {st['perplexity']:.1f}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return st


def token_grid(store: TokenStore, out: Path, n: int = 8, size: int = 160) -> None:
    """n stored images (view 0) over their token maps, one colour per code."""
    picks = np.linspace(0, len(store) - 1, min(n, len(store))).astype(int)
    sheet = Image.new("RGB", (len(picks) * (size + 4) + 4, 2 * (size + 4) + 4), (255, 255, 255))
    block = store.read(picks)
    for j, pos in enumerate(picks):
        view = render_view(store.image(int(pos)), block["views"][j, 0], size)
        sheet.paste(view, (4 + j * (size + 4), 4))
        sheet.paste(token_overlay(view, block["tokens"][j, 0], labels=False), (4 + j * (size + 4), size + 8))
    sheet.save(out)


def compared(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """`name_a` against `name_b` on the same val images: "beats", "falls below" or "is level with", called
    by McNemar's exact test at p < 0.05 on the two evaluations' per-image answers."""
    d = 100 * (a["top1"] - b["top1"])
    if "predictions" not in a or "predictions" not in b:
        return f"{name_a} {d:+.1f} points against {name_b} (no per-image answers to test)"
    right = [np.equal(r["predictions"], r["labels"]) for r in (a, b)]
    only_a, only_b, p = mcnemar(*right)
    verdict = "is level with" if p >= 0.05 else "beats" if d > 0 else "falls below"
    return (
        f"{name_a} {verdict} {name_b} ({d:+.1f} points: {only_a} images right only for {name_a}, {only_b} only "
        f"for {name_b}; McNemar p = {p:.2g})"
    )


def majority(labels: list[int]) -> float:
    """The share of the most common label: what a classifier that learned nothing reaches."""
    return float(np.bincount(labels).max() / max(len(labels), 1))


def results_of(run: Path) -> dict[str, dict]:
    """The evaluation results beside a run's checkpoint, by file name."""
    out = {}
    for pattern in RESULTS:
        for path in sorted(run.glob(pattern)):
            try:
                r = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise StoreError(f"{path}: not a readable result ({e}); remove it or write it again") from e
            if isinstance(r, dict) and "top1" in r:
                out[path.name] = r
    return out


def run_name(run: Path, runs: list[Path]) -> str:
    """A run's folder name, with its parent's when two runs share a name."""
    return run.name if [r.name for r in runs].count(run.name) == 1 else f"{run.parent.name}/{run.name}"


def report(runs: list[Path], out: Path) -> Path:
    """Write OUT/report.md and its figures for the run folders `runs`."""
    for run in runs:
        if not run.is_dir():
            raise ConfigError(
                f"{run}: not a run folder; pass folders of 'mapet pretrain' or 'mapet finetune'"
            )
    out.mkdir(parents=True, exist_ok=True)
    names = {run: run_name(run, runs) for run in runs}
    metrics = {run: read_metrics(run / "metrics.jsonl") for run in runs}
    pre = {names[r]: m for r, m in metrics.items() if m and "token_acc" in m[0]}
    fine = {names[r]: m for r, m in metrics.items() if m and "val_top1" in m[0]}
    lines = ["# Report", "", "Runs: " + ", ".join(f"`{r}`" for r in runs) + ".", ""]
    stores = _stores(runs, names)
    lines += _pretraining(pre, stores, out) + _finetuning(fine, out)
    lines += _evaluations({names[r]: results_of(r) for r in runs})
    lines += _tokenizers(stores, out)
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    return out / "report.md"


def _stores(runs: list[Path], names: dict) -> dict[str, TokenStore]:
    """The token stores the pre-training runs read, by path (a store that moved since is left out)."""
    found = {}
    for run in runs:
        try:
            tokens = json.loads((run / "config.json").read_text())["tokens"]
            found.setdefault(tokens, TokenStore.open(tokens))
        except (OSError, ValueError, KeyError, StoreError):
            continue
    return found


def _pretraining(pre: dict, stores: dict, out: Path) -> list[str]:
    if not pre:
        return []
    only = next(iter(stores.values())) if len(stores) == 1 else None
    baseline = frequency_baseline(only.stats()["codebook_usage"]) if only is not None else None
    pretrain_curves(pre, out / "pretrain_curves.png", baseline)
    lines = [
        "## Pre-training",
        "",
        "| run | steps | last epoch: cross-entropy | token top-1 |",
        "|---|---|---|---|",
    ]
    for name, m in pre.items():
        loss, acc = last_epoch(m)
        lines.append(f"| {name} | {m[-1]['step']} | {loss:.3f} | {100 * acc:.1f}% |")
    if baseline is not None:
        lines.append(f"| (code frequencies alone) | | {baseline[0]:.3f} | {100 * baseline[1]:.1f}% |")
    return [*lines, "", "![pre-training](pretrain_curves.png)", ""]


def _finetuning(fine: dict, out: Path) -> list[str]:
    if not fine:
        return []
    finetune_curves(fine, out / "finetune_curves.png")
    lines = ["## Fine-tuning", "", "| run | epochs | last val top-1 | best |", "|---|---|---|---|"]
    for name, m in fine.items():
        best = max(r["val_top1"] for r in m)
        lines.append(f"| {name} | {len(m)} | {100 * m[-1]['val_top1']:.2f}% | {100 * best:.2f}% |")
    return [*lines, "", "![fine-tuning](finetune_curves.png)", ""]


def _evaluations(results: dict[str, dict[str, dict]]) -> list[str]:
    """The results table, then McNemar verdicts between every two runs with the same result file (the same
    evaluation of the same val images)."""
    rows = [(name, f, r) for name, rs in results.items() for f, r in rs.items()]
    if not rows:
        return []
    lines = [
        "## Evaluations",
        "",
        "| run | result | top-1 | images | majority class |",
        "|---|---|---|---|---|",
    ]
    for name, f, r in rows:
        maj = f"{100 * majority(r['labels']):.1f}%" if r.get("labels") else ""
        lines.append(f"| {name} | `{f}` | {100 * r['top1']:.2f}% | {r.get('n_val', '')} | {maj} |")
    verdicts = []
    for f in sorted({f for _, f, _ in rows}):
        have = [(name, rs[f]) for name, rs in results.items() if f in rs]
        for (na, a), (nb, b) in itertools.combinations(have, 2):
            if a.get("labels") == b.get("labels"):
                verdicts.append(f"- `{f}`: {compared(a, b, na, nb)}.")
    return [*lines, "", *verdicts, ""]


def _tokenizers(stores: dict[str, TokenStore], out: Path) -> list[str]:
    lines = []
    for i, (path, store) in enumerate(stores.items()):
        st = usage_plot(store, out / f"codebook_usage_{i}.png")
        try:
            token_grid(store, out / f"token_maps_{i}.png")
            maps = f"![token maps](token_maps_{i}.png)"
        except (StoreError, SourceError, ImageError) as e:  # the images moved since: the rest still reports
            maps = f"(no token maps: {e})"
        lines += [
            f"## Token store `{path}`",
            "",
            f"{describe(store.manifest['tokenizer']['identity'])}; grid {store.grid}, K {store.k}, "
            f"{store.num_views} views, {store.manifest['n_ok']} images. {st['used_codes']} of {store.k} codes "
            f"used, perplexity {st['perplexity']:.1f}, largest cluster {100 * st['largest_cluster_share']:.1f}%.",
            "",
            f"![usage](codebook_usage_{i}.png)",
            "",
            maps,
            "",
        ]
    return lines
