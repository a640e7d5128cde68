"""`mapet import-official CKPT OUT`: checkpoints released by other codebases, as this project's model folder.

Each layout is a table from its key names to timm's VisionTransformer names (the names `mapet export` writes),
not code per model; OUT is then written as `mapet export` writes it, so timm loads it, k-NN, the linear probe
and fine-tuning read it, and `mapet validate` scores a classifier:

- mapet: aimagelab/MaPeT's six released `vit_standard_{tiny,small,base}_patch16_224_{KCLIP,VQKD}.tar`, timm
  CheckpointSaver dicts of ImageNet-1k classifiers (average pooling, fc_norm, head) whose attention has
  separate q and kv linears, as ours;
- beit: BEiT / BEiT v2 pre-trained ViTs (unilm; `{"model": ...}`): fused qkv weights with q and v biases only
  (k's is zero), LayerScale as gamma_1 / gamma_2; the pre-training heads dropped. Checkpoints with relative
  position bias (BEiT's shared or per-block bias) are refused: this ViT has absolute positions only;
- mae: MAE pre-trained ViTs (`{"model": ...}`): timm's names already; the decoder and mask token dropped;
- timm: a plain timm ViT state dict.

Loaded with weights_only=True (argparse.Namespace, which CheckpointSaver stores as `args`, allowed).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pretrain.evaluate import default_crop_pct
from pretrain.export import CONFIG, WEIGHTS, export, vit_from_timm
from pretrain.finetune import Classifier
from tokenkit.errors import StoreError, load_failure

# per layout: (pattern, replacement) rules applied in order to every key; a key mapped to "" is dropped
RULES = {
    "mapet": [],  # the q / kv linears are fused below; every other name is timm's
    "beit": [
        (r"^blocks\.(\d+)\.gamma_1$", r"blocks.\1.ls1.gamma"),
        (r"^blocks\.(\d+)\.gamma_2$", r"blocks.\1.ls2.gamma"),
        (r"^(lm_head|cls_pt_layers|mask_token|norm_pre_cls)\b.*", ""),  # the pre-training heads
    ],
    "mae": [(r"^(decoder_.*|mask_token)$", "")],
    "timm": [],
}
CROP_PCT = {"mapet": 0.9}  # the evaluation crop a layout's own code validates with (MaPeT's timm config)
CONTAINERS = ("state_dict_ema", "state_dict", "model", "module")  # where codebases keep the weights, in order


def load_official(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a released checkpoint (a CheckpointSaver or `{"model": ...}` dict, or the state
    dict itself)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any bytes may arrive here; torch's unpickler raises many kinds
        raise StoreError(f"{path}: not a usable checkpoint, {load_failure(e)}; pass the released file") from e
    if isinstance(ckpt, dict):
        for name in CONTAINERS:
            if isinstance(ckpt.get(name), dict) and ckpt[name]:
                ckpt = ckpt[name]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise StoreError(f"{path}: holds no state dict of tensors; pass a released checkpoint")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def detect_layout(state: dict) -> str:
    if any(k.endswith("attn.kv.weight") for k in state):
        return "mapet"
    if any(k.endswith(("attn.q_bias", "gamma_1")) for k in state):
        return "beit"
    if any(k.startswith("decoder_") for k in state):
        return "mae"
    return "timm"


def to_timm(state: dict, layout: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict under timm's VisionTransformer names."""
    if bad := [k for k in state if "relative_position" in k or k.startswith("rel_pos_bias")]:
        raise StoreError(
            f"{path}: uses relative position bias ({bad[0]}); this ViT has absolute positions only: pass a "
            "checkpoint pre-trained with absolute position embeddings"
        )
    out = {}
    for key, value in state.items():
        for pattern, repl in RULES[layout]:
            key = re.sub(pattern, repl, key)
        if key:
            out[key] = value
    if layout == "mapet":
        _paired(_fuse_q_kv, out, path)
    if layout == "beit":
        _paired(_beit_biases, out, path)
    return out


def _fuse_q_kv(s: dict) -> None:
    """attn.q + attn.kv -> attn.qkv (q, k, v stacked, as timm's)."""
    for key in [k for k in s if k.endswith("attn.q.weight")]:
        b = key.removesuffix("q.weight")
        s[b + "qkv.weight"] = torch.cat([s.pop(b + "q.weight"), s.pop(b + "kv.weight")])
        if b + "q.bias" in s:
            s[b + "qkv.bias"] = torch.cat([s.pop(b + "q.bias"), s.pop(b + "kv.bias")])


def _beit_biases(s: dict) -> None:
    """BEiT's q_bias and v_bias -> one qkv bias with k's zero."""
    for key in [k for k in s if k.endswith("attn.q_bias")]:
        b = key.removesuffix("q_bias")
        q, v = s.pop(key), s.pop(b + "v_bias")
        s[b + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def _paired(fix, s: dict, path: Path) -> None:
    try:
        fix(s)
    except KeyError as e:
        raise StoreError(f"{path}: has no {e.args[0]} beside its pair; not a complete checkpoint") from e


def classifier_from_timm(s: dict[str, torch.Tensor], path: Path, args: dict | None = None) -> Classifier:
    """Our classifier (average pooling, fc_norm, head) from a timm-named classifier state dict; args: timm
    arguments known (the head count)."""
    enc = {k: v for k, v in s.items() if not k.startswith(("fc_norm.", "head."))}
    try:
        D = s["cls_token"].shape[-1]
        enc["norm.weight"], enc["norm.bias"] = torch.ones(D), torch.zeros(D)  # the classifier drops it
        net = Classifier(vit_from_timm(enc, args or {}, path), s["head.weight"].shape[0])
        net.fc_norm.load_state_dict({"weight": s["fc_norm.weight"], "bias": s["fc_norm.bias"]})
        net.head.load_state_dict({"weight": s["head.weight"], "bias": s["head.bias"]})
    except (KeyError, RuntimeError) as e:
        raise StoreError(f"{path}: not a complete classifier ({str(e).splitlines()[0][:120]})") from e
    return net.eval()


def is_classifier(s: dict) -> bool:
    return "fc_norm.weight" in s and "head.weight" in s and "norm.weight" not in s


def import_official(path: Path, out: Path, layout: str | None = None) -> tuple[Path, str]:
    """Write the model folder OUT from the released checkpoint at `path`; returns OUT and the layout read."""
    state = load_official(path)
    layout = layout or detect_layout(state)
    s = to_timm(state, layout, path)
    if is_classifier(s):
        model, what = classifier_from_timm(s, path), f"a classifier over {s['head.weight'].shape[0]} classes"
    else:
        model, what = (
            vit_from_timm({k: v for k, v in s.items() if not k.startswith("head.")}, {}, path),
            "an encoder",
        )
    size = model.encoder.cfg.image_size if isinstance(model, Classifier) else model.cfg.image_size
    card = (f"# {Path(out).name}\n\n{what}, imported by `mapet import-official` from `{path}` ({layout} layout: "
            "its key names mapped onto timm's ViT).\n")  # fmt: skip
    return export(model, out, card, CROP_PCT.get(layout) or default_crop_pct(size)), layout


def classifier_checkpoint(folder: Path) -> dict:
    """A classifier folder (`mapet export` of a fine-tuning, or `mapet import-official`) as the checkpoint
    dict `mapet validate` reads: vit, num_classes, classes (config.json's label names, else none: val
    classes then index by their sorted folder names, as ImageNet's) and model."""
    try:
        s = load_file(str(folder / WEIGHTS))
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise StoreError(f"{folder}: not a readable model folder ({e}); pass a 'mapet export' folder") from e
    if not is_classifier(s):
        raise StoreError(f"{folder}: holds an encoder, not a classifier; validate a fine-tuned model")
    net = classifier_from_timm(s, folder, cfg.get("model_args") if isinstance(cfg, dict) else None)
    return {"vit": asdict(net.encoder.cfg), "num_classes": net.head.out_features,
            "classes": cfg.get("label_names") or [], "model": net.state_dict()}  # fmt: skip
