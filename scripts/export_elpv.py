"""Export the elpv-dataset package (2,624 solar-cell EL images, CC BY-NC-SA 4.0) into image folders.

    python scripts/export_elpv.py OUT [--val-fraction 0.25] [--label-fraction 0.1] [--seed 0] [--limit N]

OUT/images/cell_NNNN.png holds every image once; OUT/split.json records the seeded split, stratified by
(cell type, defect class); two labelled views of it are made of symlinks:
    OUT/type/{train,val}/{mono,poly}/cell_NNNN.png
    OUT/defect/{train,val}/{p000,p033,p067,p100}/cell_NNNN.png   (defect probability 0, 1/3, 2/3, 1)
and the labelled subset that fine-tuning with few labels reads (the same share of each cell type, seeded):
    OUT/type/train-10pct/{mono,poly}/cell_NNNN.png
Re-running with the same arguments changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from elpv_dataset.utils import load_dataset
from PIL import Image


def split_indices(strata: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) is_val, taking round(val_fraction * n) of each stratum with a seeded generator."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(strata), dtype=bool)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rng.shuffle(idx)
        is_val[idx[: int(round(val_fraction * len(idx)))]] = True
    return is_val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument(
        "--label-fraction", type=float, default=0.1, help="share of the training images kept labelled"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="keep the first N images of each stratum (tests)")
    args = ap.parse_args()
    done = args.out / "split.json"
    want = {
        "val_fraction": args.val_fraction,
        "label_fraction": args.label_fraction,
        "seed": args.seed,
        "limit": args.limit,
    }
    if done.exists() and json.loads(done.read_text())["args"] == want:
        print(f"elpv: {args.out} already exported")
        return
    images, probs, types = load_dataset()  # (N, 300, 300) uint8, (N,) float, (N,) str
    defect = np.rint(probs * 3).astype(int)  # 0, 1, 2, 3 = probability 0, 1/3, 2/3, 1
    strata = np.array([f"{t}-{d}" for t, d in zip(types, defect, strict=True)])
    keep = np.ones(len(images), dtype=bool)
    if args.limit is not None:
        keep[:] = False
        for s in np.unique(strata):
            keep[np.flatnonzero(strata == s)[: args.limit]] = True
    is_val = split_indices(strata, args.val_fraction, args.seed)
    # the labelled subset: a share of each cell type's training images (a second seeded draw)
    is_labelled = split_indices(np.where(is_val | ~keep, "", types), args.label_fraction, args.seed + 1)
    few = f"train-{round(100 * args.label_fraction)}pct"
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in np.flatnonzero(keep):
        name = f"cell_{i:04d}.png"
        Image.fromarray(images[i], "L").save(args.out / "images" / name)
        split = "val" if is_val[i] else "train"
        folders = [("type", split, str(types[i])), ("defect", split, f"p{round(100 * defect[i] / 3):03d}")]
        if split == "train" and is_labelled[i]:
            folders.append(("type", few, str(types[i])))
        for task, part, label in folders:
            d = args.out / task / part / label
            d.mkdir(parents=True, exist_ok=True)
            link = d / name
            if not link.exists():
                os.symlink(os.path.relpath(args.out / "images" / name, d), link)
        rows.append(
            {
                "file": name,
                "split": split,
                "labelled": bool(split == "train" and is_labelled[i]),
                "type": str(types[i]),
                "defect": int(defect[i]),
            }
        )
    done.write_text(
        json.dumps({"args": want, "source": "elpv-dataset (CC BY-NC-SA 4.0)", "images": rows}, indent=1)
    )
    n_val, n_few = sum(r["split"] == "val" for r in rows), sum(r["labelled"] for r in rows)
    print(
        f"elpv: {len(rows)} images -> {args.out} ({len(rows) - n_val} train, {n_few} of them in type/{few}; {n_val} val)"
    )


if __name__ == "__main__":
    main()
