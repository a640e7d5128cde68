"""`mapet export`: a pre-trained encoder as safetensors with timm's VisionTransformer key names.

Loads into `timm.models.vision_transformer.VisionTransformer(img_size, patch_size, embed_dim, depth,
num_heads, init_values=<layer scale>, qkv_bias=True, num_classes=0)`; the timm arguments are stored in the
file's metadata under `timm_args`. Our separate q and kv linears become timm's fused qkv.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from pretrain.vit import VisionTransformer
from tokenkit.journal import atomic_write_bytes


def timm_state_dict(enc: VisionTransformer) -> dict[str, torch.Tensor]:
    s = enc.state_dict()
    out = {
        "cls_token": s["cls_token"],
        "pos_embed": s["pos_embed"],
        "patch_embed.proj.weight": s["patch_embed.weight"],
        "patch_embed.proj.bias": s["patch_embed.bias"],
        "norm.weight": s["norm.weight"],
        "norm.bias": s["norm.bias"],
    }
    for i in range(len(enc.blocks)):
        b, t = f"blocks.{i}.", f"blocks.{i}."
        out[t + "attn.qkv.weight"] = torch.cat([s[b + "attn.q.weight"], s[b + "attn.kv.weight"]])  # (3D, D)
        out[t + "attn.qkv.bias"] = torch.cat([s[b + "attn.q.bias"], s[b + "attn.kv.bias"]])  # (3D,)
        for ours, theirs in (
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attn.proj", "attn.proj"),
            ("mlp.0", "mlp.fc1"),
            ("mlp.2", "mlp.fc2"),
        ):
            out[f"{t}{theirs}.weight"], out[f"{t}{theirs}.bias"] = (
                s[f"{b}{ours}.weight"],
                s[f"{b}{ours}.bias"],
            )
        out[t + "ls1.gamma"], out[t + "ls2.gamma"] = s[b + "gamma1"], s[b + "gamma2"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def timm_args(enc: VisionTransformer) -> dict:
    c = enc.cfg
    return {
        "img_size": c.image_size,
        "patch_size": c.patch_size,
        "embed_dim": c.dim,
        "depth": c.depth,
        "num_heads": c.heads,
        "mlp_ratio": c.mlp_ratio,
        "init_values": c.layer_scale,
        "qkv_bias": True,
        "num_classes": 0,
    }


def export(enc: VisionTransformer, out: Path) -> Path:
    data = save(timm_state_dict(enc), metadata={"timm_args": json.dumps(timm_args(enc)), "format": "pt"})
    atomic_write_bytes(Path(out), data)
    return Path(out)
