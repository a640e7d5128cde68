"""Encoders as timm models, both ways.

`mapet export CHECKPOINT DIR` writes a folder that timm loads as it is,
`timm.create_model("local-dir:DIR", pretrained=True)`: `model.safetensors` (timm's VisionTransformer key
names; our separate q and kv linears become timm's fused qkv), `config.json` (the architecture, the
`model_args` that give it our geometry, and the `pretrained_cfg` timm's data pipeline reads: input size,
mean, std, crop_pct, interpolation) and a `README.md` model card. An encoder becomes timm's ViT with no
head, average pooling of the final-normed patch tokens (the features k-NN and the linear probe judge); a
fine-tuned classifier (`mapet finetune`'s OUT/last.pt) becomes the same ViT with fc_norm and its head,
logits and all. `load_timm` reads an encoder folder back, or the state dict of any plain timm ViT with a class
token (MAE's, DeiT's, an AugReg ViT's, saved as safetensors), so that k-NN, the linear probe and fine-tuning
judge encoders from other codebases by the same protocol.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from pretrain.data import IMAGENET_MEAN, IMAGENET_STD
from pretrain.vit import VisionTransformer, ViTConfig
from tokenkit.errors import ConfigError, StoreError

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"  # an exported folder's files
TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}  # timm's names by width
HEADS = {1280: 16}  # widths whose ViTs do not have 64-wide heads (ViT-H/14: 16 of 80)
# per block: the layers whose weight and bias carry over unchanged (the same names as timm's)
_SAME = ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2")
# every key of timm's plain VisionTransformer (class token, learned positions, no pooling norm); head.* is dropped
_TIMM_KEY = re.compile(
    r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|head\..*"
    r"|blocks\.\d+\.((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|ls[12]\.gamma)"
)


def _shape(s: dict, key: str, path: Path) -> tuple:
    if key not in s:
        raise StoreError(f"{path}: no {key}; not a complete timm ViT state dict")
    return tuple(s[key].shape)


def _split(model: nn.Module) -> tuple[VisionTransformer, nn.Module | None]:
    """(encoder, classifier or None) of an encoder or a fine-tuned pretrain.finetune.Classifier."""
    return (model, None) if isinstance(model, VisionTransformer) else (model.encoder, model)


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm key names for an encoder, or for a fine-tuned classifier (pretrain.finetune.Classifier): its
    fc_norm and head, and no final norm (timm's VisionTransformer with global_pool="avg")."""
    enc, classifier = _split(model)
    s = enc.state_dict()
    out = {
        "cls_token": s["cls_token"],
        "pos_embed": s["pos_embed"],
        "patch_embed.proj.weight": s["patch_embed.weight"],
        "patch_embed.proj.bias": s["patch_embed.bias"],
    }
    if classifier is None:
        out["norm.weight"], out["norm.bias"] = s["norm.weight"], s["norm.bias"]
    else:
        for name in ("fc_norm", "head"):
            layer = getattr(classifier, name)
            out[f"{name}.weight"], out[f"{name}.bias"] = layer.weight, layer.bias
    for i in range(len(enc.blocks)):
        b = f"blocks.{i}."  # the same block prefix in both
        out[b + "attn.qkv.weight"] = torch.cat([s[b + "attn.q.weight"], s[b + "attn.kv.weight"]])  # (3D, D)
        out[b + "attn.qkv.bias"] = torch.cat([s[b + "attn.q.bias"], s[b + "attn.kv.bias"]])  # (3D,)
        for name in _SAME:
            for t in ("weight", "bias"):
                out[f"{b}{name}.{t}"] = s[f"{b}{name}.{t}"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = s[b + "ls1.gamma"], s[b + "ls2.gamma"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def timm_args(model: nn.Module) -> dict:
    """timm VisionTransformer arguments: of an encoder, or of a fine-tuned classifier (average pooling of the
    patch tokens, fc_norm, head)."""
    enc, classifier = _split(model)
    c = enc.cfg
    head = (  # the encoder's features: the mean of the final-normed patch tokens
        {"num_classes": 0, "global_pool": "avg", "fc_norm": False}
        if classifier is None
        else {"num_classes": classifier.head.out_features, "global_pool": "avg", "fc_norm": True}
    )
    return {
        "img_size": c.image_size,
        "patch_size": c.patch_size,
        "embed_dim": c.dim,
        "depth": c.depth,
        "num_heads": c.heads,
        "mlp_ratio": c.mlp_ratio,
        "init_values": c.layer_scale,
        "qkv_bias": True,
        **head,
    }


def timm_config(model: nn.Module, crop_pct: float, classes: list[str] | None = None) -> dict:
    """config.json of an exported folder, as timm's local-dir loader reads it: a registered ViT name (the
    nearest by width, patch and size; `model_args` carry the whole geometry, so the name only has to build a
    VisionTransformer), the model arguments, and the pretrained_cfg timm's data pipeline resolves."""
    args = timm_args(model)
    S = args["img_size"]
    name = f"vit_{TIMM_SIZES.get(args['embed_dim'], 'base')}_patch{args['patch_size']}_{S}"
    cfg = {
        "architecture": name if _timm().is_model(name) else "vit_base_patch16_224",
        "num_classes": args["num_classes"],
        "num_features": args["embed_dim"],
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, S, S], "fixed_input_size": True, "interpolation": "bicubic",
                           "crop_pct": crop_pct, "crop_mode": "center", "mean": list(IMAGENET_MEAN),
                           "std": list(IMAGENET_STD), "num_classes": args["num_classes"],
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }  # fmt: skip
    if classes:
        cfg["label_names"] = list(classes)
    return cfg


def export(model: nn.Module, out: Path, card: str, crop_pct: float, classes: list[str] | None = None) -> Path:
    """Write the folder OUT (model.safetensors, config.json, README.md = `card`) for an encoder or a
    fine-tuned classifier: built beside OUT and renamed into place, so OUT is whole or absent. An existing
    OUT is replaced only when it is an earlier export (nothing but those three files)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - {WEIGHTS, CONFIG, CARD}):
        raise ConfigError(f"{out}: exists and is not an exported model folder; pass a new folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        meta = {"timm_args": json.dumps(timm_args(model)), "format": "pt"}
        (tmp / WEIGHTS).write_bytes(save(timm_state_dict(model), metadata=meta))
        (tmp / CONFIG).write_text(json.dumps(timm_config(model, crop_pct, classes), indent=1) + "\n")
        (tmp / CARD).write_text(card)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as e:  # named by the folder the user asked for
        raise OSError(e.errno, e.strerror, str(out)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _timm():
    import timm  # a runtime dependency, imported where it is used: `mapet` starts faster without it

    return timm


def load_timm(path: Path) -> VisionTransformer:
    """The encoder in a `mapet export` folder, or in a safetensors file with timm ViT key names (its
    model.safetensors, or a timm ViT's state dict). Geometry comes from the tensor shapes (width, patch size,
    grid, depth, MLP ratio); the head count from the `timm_args` metadata, else width / 64 (ViT-T/S/B/L;
    16 for ViT-H's 1280). A model without LayerScale
    gets gammas of one (the same function), one without q/k/v biases gets zero biases. The classifier
    (`head.*`) is dropped; any other key timm's plain ViT does not have (register tokens, a pooling norm, a
    relative position bias) is refused, rather than silently left out."""
    path = Path(path)
    if path.is_dir():  # an exported folder
        path = path / WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            meta, s = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise StoreError(
            f"{path}: not a readable safetensors file ({e}); pass a 'mapet export' output"
        ) from e
    return vit_from_timm(s, json.loads(meta.get("timm_args", "{}")), path)


def vit_from_timm(s: dict[str, torch.Tensor], args: dict, path: Path) -> VisionTransformer:
    """Our encoder from a state dict under timm's ViT names (load_timm); args: timm arguments known (the head
    count); path: the file, for errors."""
    s = dict(s)
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")
    if missing := [k for k in need if k not in s]:
        raise StoreError(
            f"{path}: not a plain timm ViT encoder (no {', '.join(missing)}); pass an encoder from "
            "'mapet export' of a pre-training run, or a timm ViT state dict with a class token and final norm"
        )
    if extra := sorted(k for k in s if not _TIMM_KEY.fullmatch(k)):
        raise StoreError(
            f"{path}: keys a plain timm ViT does not have: {', '.join(extra[:4])}{' ...' * (len(extra) > 4)}; "
            "not supported"
        )
    D, p = s["cls_token"].shape[-1], s["patch_embed.proj.weight"].shape[-1]
    n = s["pos_embed"].shape[1] - 1
    G, depth = math.isqrt(n), 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    if G * G != n:
        raise StoreError(f"{path}: pos_embed holds {n} patch positions, not a square grid; not supported")
    cfg = ViTConfig(
        image_size=G * p,
        patch_size=p,
        dim=D,
        depth=depth,
        heads=args.get("num_heads", HEADS.get(D, max(1, D // 64))),
        mlp_ratio=_shape(s, "blocks.0.mlp.fc1.weight", path)[0] / D,
        layer_scale=1.0,
        drop_path=0.0,
    )
    enc = VisionTransformer(cfg)
    ours = enc.state_dict()
    try:
        state = {
            "cls_token": s.pop("cls_token"),
            "pos_embed": s.pop("pos_embed"),
            "patch_embed.weight": s.pop("patch_embed.proj.weight"),
            "patch_embed.bias": s.pop("patch_embed.proj.bias", torch.zeros(D)),
            "norm.weight": s.pop("norm.weight"),
            "norm.bias": s.pop("norm.bias"),
        }
        for i in range(depth):
            b = f"blocks.{i}."
            w = s.pop(b + "attn.qkv.weight")  # (3D, D): q, k, v
            bias = s.pop(b + "attn.qkv.bias", torch.zeros(3 * D))
            state[b + "attn.q.weight"], state[b + "attn.kv.weight"] = w[:D], w[D:]
            state[b + "attn.q.bias"], state[b + "attn.kv.bias"] = bias[:D], bias[D:]
            for name in _SAME:
                for t in ("weight", "bias"):
                    state[f"{b}{name}.{t}"] = s.pop(f"{b}{name}.{t}")
            for name in ("ls1.gamma", "ls2.gamma"):
                state[b + name] = s.pop(b + name, torch.ones(D))
    except KeyError as e:
        raise StoreError(f"{path}: no {e.args[0]}; not a complete timm ViT state dict") from e
    wrong = [k for k, v in state.items() if v.shape != ours[k].shape]
    if wrong:
        raise StoreError(
            f"{path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected "
            f"{tuple(ours[wrong[0]].shape)} for the geometry read from its shapes; not supported"
        )
    enc.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()})
    return enc.eval()
