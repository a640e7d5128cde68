"""Write the quickstart report: RUN/report.md with the accuracy tables and PNG figures.

    python scripts/report.py RUN               # the quickstart's report
    python scripts/report.py RUN --tokenizers  # scripts/compare_tokenizers.sh's table: RUN/tokenizers.md

The figures and McNemar verdicts are `mapet report`'s (pretrain/report.py); this script lays them out for
the quickstart's folder. Reads what the quickstart's commands wrote: RUN/tokens (store),
RUN/pretrain-{mapet,beit}/metrics.jsonl and RUN/eval/*.json (k-NN, linear probe, and `mapet validate` of each fine-tuned encoder). Figures: pre-training
loss and token accuracy of both objectives, codebook usage, and a grid of images with their token maps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pretrain.report import (
    compared,
    frequency_baseline,
    last_epoch,
    majority,
    pretrain_curves,
    read_metrics,
    token_grid,
    usage_plot,
)
from tokenkit.quality import label_quality
from tokenkit.store import TokenStore
from tokenkit.tokenizer import describe

ENCODERS = ("random", "beit", "mapet")
TASKS = {"type": "cell type (mono / poly)", "defect": "defect class (4 levels)"}
EVALS = {"knn": "k-NN", "linprobe": "linear probe"}


def verdicts(results: dict) -> list[str]:
    """One line per task and frozen-feature evaluation: does pre-training beat the random-init encoder?
    results[(task, encoder, eval)] is the evaluation's JSON."""
    out = []
    for task, desc in TASKS.items():
        for ev, name in EVALS.items():
            base = results[task, "random", ev]
            parts = [compared(results[task, enc, ev], base, enc, "random init") for enc in ("mapet", "beit")]
            out.append(f"- {desc}, {name}: " + "; ".join(parts) + ".")
    return out


def finetune_section(ft: dict, cfg: dict, labelled: int, unlabelled: int) -> list[str]:
    """The fine-tuning table and its three verdicts: each pre-training against scratch, MaPeT against BEiT.
    ft[encoder]: `mapet validate`'s JSON of its fine-tuned classifier; cfg: the fine-tuning config;
    labelled: the images it trained on, unlabelled: the images pre-training read."""
    names = {"random": "scratch (random init)", "beit": "BEiT-pretrained", "mapet": "MaPeT-pretrained"}
    return [
        "## Fine-tuning with few labels (cell type, val split)",
        "",
        f"Pre-training read all {unlabelled} training images without labels; fine-tuning then sees the cell type "
        f"of {labelled} of them ({100 * labelled / unlabelled:.0f}%, the same share of each type), as semi-"
        "supervised benchmarks fine-tune on 1% or 10% of ImageNet's labels. The three encoders are fine-tuned "
        f"end to end with one recipe: {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, AdamW lr {cfg['lr']:g} with {cfg['warmup_epochs']:g} warmup epoch(s) and cosine, "
        f"layer decay {cfg['layer_decay']}, drop path {cfg['drop_path']}, label smoothing "
        f"{cfg['label_smoothing']}, RandomResizedCrop {cfg['crop_scale'][0]:g}-{cfg['crop_scale'][1]:g} and flip; "
        "each val image read whole (`mapet validate --crop-pct 1.0`).",
        "",
        "| encoder | fine-tuned top-1 |",
        "|---|---|",
        *[f"| {names[enc]} | {100 * ft[enc]['top1']:.1f}% |" for enc in ("random", "beit", "mapet")],
        f"| (the majority class) | {100 * majority(ft['random']['labels']):.1f}% |",
        "",
        f"- {compared(ft['mapet'], ft['random'], 'MaPeT', 'scratch')}.",
        f"- {compared(ft['beit'], ft['random'], 'BEiT', 'scratch')}.",
        f"- {compared(ft['mapet'], ft['beit'], 'MaPeT', 'BEiT')}.",
        "",
    ]


def tokenizer_table(run: Path) -> None:
    """RUN/tokenizers.md: the quickstart's HOG run and compare_tokenizers.sh's other tokenizers, one row each,
    with each fine-tuning judged against HOG's by McNemar's test."""
    rows = {"hog": (run / "tokens", run / "pretrain-mapet", {
        "linprobe-type": run / "eval" / "linprobe-mapet-type.json",
        "linprobe-defect": run / "eval" / "linprobe-mapet-defect.json",
        "finetune-type": run / "eval" / "finetune-mapet-type.json",
    })}  # fmt: skip
    for t in ("pixels", "clip"):
        d = run / f"tokenizer-{t}"
        rows[t] = (d / "tokens", d / "pretrain-mapet", {k: d / "eval" / f"{k}.json" for k in rows["hog"][2]})
    lines = [
        "# Tokenizers at demo scale",
        "",
        "The quickstart's budget (mapet_micro, MaPeT pre-training on the same ELPV images and views, K 256) with",
        "three tokenizers. Codes/type: what the codes say about their image's cell type (`tokenkit inspect",
        "--labels`); token loss: MaPeT's cross-entropy on the predicted patches in its last epoch, against",
        "predicting from the codes' frequencies alone; then the linear probe of both tasks (all training labels)",
        "and the fine-tuning on 10% of the cell-type labels (one recipe), on the val split.",
        "",
        "| tokenizer | codes/type NMI | purity | token loss (frequencies) | linear probe: type | defect | fine-tuned, 10% labels |",
        "|---|---|---|---|---|---|---|",
    ]
    evals = {}
    for t, (tokens, pre, ev) in rows.items():
        store = TokenStore.open(tokens)
        q, st = label_quality(store), store.stats()
        loss, _ = last_epoch(read_metrics(pre / "metrics.jsonl"))
        base, _ = frequency_baseline(st["codebook_usage"])
        evals[t] = {k: json.loads(p.read_text()) for k, p in ev.items()}
        e = evals[t]
        lines.append(
            f"| {describe(store.manifest['tokenizer']['identity'])} | {q['nmi']:.3f} | {100 * q['purity']:.1f}% | "
            f"{loss:.2f} ({base:.2f}) | {100 * e['linprobe-type']['top1']:.1f}% | "
            f"{100 * e['linprobe-defect']['top1']:.1f}% | {100 * e['finetune-type']['top1']:.1f}% |"
        )
    lines += [
        "",
        *[
            f"- fine-tuned: {compared(evals[t]['finetune-type'], evals['hog']['finetune-type'], t, 'hog')}."
            for t in ("pixels", "clip")
        ],
        "",
    ]
    (run / "tokenizers.md").write_text("\n".join(lines))
    print(f"table: {run / 'tokenizers.md'}")


def main() -> None:
    run = Path(sys.argv[1])
    if sys.argv[2:] == ["--tokenizers"]:
        tokenizer_table(run)
        return
    store = TokenStore.open(run / "tokens")
    st = usage_plot(store, run / "codebook_usage.png")
    baseline = frequency_baseline(st)
    pre = {obj: read_metrics(run / f"pretrain-{obj}" / "metrics.jsonl") for obj in ("mapet", "beit")}
    pretrain_curves(pre, run / "pretrain_curves.png", baseline)
    learned = {obj: last_epoch(m) for obj, m in pre.items()}
    token_grid(store, run / "token_maps.png")
    results = {
        (task, enc, ev): json.loads((run / "eval" / f"{ev}-{enc}-{task}.json").read_text())
        for task in TASKS
        for enc in ENCODERS
        for ev in EVALS
    }
    finetuned = {
        enc: json.loads((run / "eval" / f"finetune-{enc}-type.json").read_text()) for enc in ENCODERS
    }
    ft_cfg = json.loads((run / "finetune-mapet" / "result.json").read_text())["config"]
    split = json.loads((run / "elpv" / "split.json").read_text())["images"]
    n_labelled, n_train = sum(r["labelled"] for r in split), sum(r["split"] == "train" for r in split)
    quality = label_quality(store)
    knn = results["type", "random", "knn"]
    crop = knn.get("crop_pct", 1.0)
    times = (run / "timings.txt").read_text() if (run / "timings.txt").exists() else ""
    lines = [
        "# Quickstart report",
        "",
        f"Data: ELPV solar cells (CC BY-NC-SA 4.0), {store.manifest['n_ok']} training images tokenized; "
        f"tokenizer: {describe(store.manifest['tokenizer']['identity'])}, grid {store.grid}, K {store.k}, "
        f"{store.num_views} views.",
        "",
        *finetune_section(finetuned, ft_cfg, n_labelled, n_train),
        "## Frozen-feature accuracy (val split)",
        "",
        f"Each image read at {knn['image_size']} px, "
        + ("whole (`--crop-pct 1.0`)." if crop == 1.0 else f"centre crop `--crop-pct {crop}`."),
        "",
        "| task | encoder | k-NN top-1 | linear probe top-1 | majority class |",
        "|---|---|---|---|---|",
    ]
    for task, desc in TASKS.items():
        for enc in ENCODERS:
            k, lp = results[task, enc, "knn"], results[task, enc, "linprobe"]
            lines.append(
                f"| {desc} | {enc} | {100 * k['top1']:.1f}% | {100 * lp['top1']:.1f}% | "
                f"{100 * k['majority_baseline']:.1f}% |"
            )
    lines += [
        "",
        *verdicts(results),
        "",
        "These are tiny CPU budgets: the numbers are what they are, not tuned. McNemar's test pairs the two",
        "encoders' answers on the same val images; a difference with p >= 0.05 could be chance.",
        "",
        "## Pre-training",
        "",
        "The predicted patches' tokens (training batches, mean of the run's last epoch), against predicting",
        "every token from the codes' frequencies alone, without looking at the image:",
        "",
        "| objective | cross-entropy (nats) | token top-1 |",
        "|---|---|---|",
        *[f"| {obj} | {loss:.2f} | {100 * acc:.1f}% |" for obj, (loss, acc) in learned.items()],
        f"| code frequencies alone | {baseline[0]:.2f} | {100 * baseline[1]:.1f}% |",
        "",
        *[
            f"- {obj}: cross-entropy {loss:.2f} against {baseline[0]:.2f} nats, top-1 {100 * acc:.1f}% against "
            f"{100 * baseline[1]:.1f}%: it {'learned' if loss < baseline[0] else 'did not learn'} to predict "
            "tokens from the visible patches."
            for obj, (loss, acc) in learned.items()
        ],
        "",
        "![curves](pretrain_curves.png)",
        "",
        "## Tokenizer",
        "",
        f"{st['used_codes']} of {store.k} codes used, perplexity {st['perplexity']:.1f}, largest cluster "
        f"{100 * st['largest_cluster_share']:.1f}% of tokens. What the codes say about the cell type of their "
        f"image (`tokenkit inspect --labels`): NMI {quality['nmi']:.3f}, AMI {quality['ami']:.3f}, purity "
        f"{100 * quality['purity']:.1f}% against {100 * quality['majority_label_share']:.1f}% for codes that say "
        "nothing.",
        "",
        "![usage](codebook_usage.png)",
        "",
        "Images (top) and their token maps (bottom; one colour per code):",
        "",
        "![tokens](token_maps.png)",
        "",
    ]
    if times:
        lines += ["## Stage times (this machine)", "", "```", times.strip(), "```", ""]
    (run / "report.md").write_text("\n".join(lines))
    print(f"report: {run / 'report.md'}")


if __name__ == "__main__":
    main()
