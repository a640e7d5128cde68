"""Checkpoints: one self-describing dict, written atomically, loaded without executing code.

    {format_version, kind: "mapet-checkpoint", objective, vit (ViTConfig), config (TrainConfig as a dict),
     store {tokenizer_id, k, grid, num_views}, store_files, world, step, epoch, model, optimizer, scaler}
    {format_version, kind: "mapet-finetune", vit, num_classes, classes, config (FinetuneConfig), world, step,
     epoch, history, model, optimizer, scaler, [result | in_epoch]}

RUN/ckpt-SSSSSSSS.pt for the last `keep` steps and RUN/last.pt (a hard link to the newest), each written to a
temporary name, fsynced and renamed; pre-training and fine-tuning runs alike. There is no RNG state: every random draw of step s is seeded by
(seed, s), so restoring model, optimizer and step resumes the exact run.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from tokenkit.errors import StoreError, load_failure
from tokenkit.journal import atomic_write_bytes, format_mismatch, fsync_dir

FORMAT_VERSION = 2  # 2: the store is named by its tokenizer id
KIND = "mapet-checkpoint"
FINETUNE_KIND = "mapet-finetune"  # pretrain/finetune.py's OUT/last.pt
FIELDS = {  # kind: the fields every reader of it relies on
    KIND: ("objective", "vit", "config", "store", "step", "epoch", "model", "optimizer"),
    FINETUNE_KIND: ("vit", "num_classes", "config", "step", "epoch", "model", "optimizer"),
}
_WHAT = {  # kind: (what to pass, the command that writes it, its name in errors)
    KIND: ("RUN/last.pt", "mapet pretrain", "mapet"),
    FINETUNE_KIND: ("OUT/last.pt", "mapet finetune", "'mapet finetune'"),
}


def save_checkpoint(run: Path, ckpt: dict, keep: int = 2, kind: str = KIND) -> Path:
    """Write RUN/ckpt-SSSSSSSS.pt (SSSSSSSS: ckpt["step"]), move RUN/last.pt to it in one rename, and keep the
    newest `keep` checkpoints."""
    run = Path(run)
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, "kind": kind, **ckpt}, buf)
    path = run / f"ckpt-{ckpt['step']:08d}.pt"
    atomic_write_bytes(path, buf.getvalue())
    point_last(run, path)
    for old in sorted(run.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def point_last(run: Path, path: Path) -> None:
    """RUN/last.pt becomes (a hard link to) the checkpoint `path` in one rename."""
    tmp = run / f".last.pt.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, run / "last.pt")
    fsync_dir(run)


def load_checkpoint(path: Path, map_location="cpu", kind: str | tuple[str, ...] = KIND) -> dict:
    """Load with weights_only=True: a pickle that would run code is refused with a one-line error. `kind`:
    the checkpoint kind(s) accepted (errors name the first)."""
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    where, cmd, name = _WHAT[kinds[0]]
    if not path.is_file():
        raise StoreError(f"{path}: checkpoint not found; pass {where} of a '{cmd}' run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any bytes may arrive here; torch's unpickler raises many kinds
        what = (
            "" if isinstance(e, pickle.UnpicklingError) else "unreadable checkpoint, truncated or corrupt: "
        )
        raise StoreError(
            f"{path}: {what}{load_failure(e)}; copy it again or re-create it with '{cmd}'"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in kinds:
        raise StoreError(f"{path}: not a {name} checkpoint; pass {where} of a '{cmd}' run")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: {format_mismatch(ckpt.get('format_version'), FORMAT_VERSION)}")
    missing = [f for f in FIELDS[ckpt["kind"]] if f not in ckpt]
    if missing:
        raise StoreError(
            f"{path}: a {name} checkpoint without {', '.join(missing)}; it is damaged, re-create it with '{cmd}'"
        )
    return ckpt
