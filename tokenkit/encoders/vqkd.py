"""BEiT v2's VQ-KD tokenizer (Peng et al. 2022): a ViT encoder, a 2-layer projection to 32-d, and the
nearest of 8192 L2-normalised codes; BEiT v2's `get_codebook_indices`, recomputed.

Input: the view in [0, 1] scaled to [-1, 1] (BEiT v2's default pre-processing: x * 255 / 127.5 - 1). The
encoder is BEiT v2's ViT (class token, absolute position embeddings, q and v biases but no k bias, no
LayerScale, LayerNorm eps 1e-6, mean-pooling mode: no final norm, `fc_norm` on the patch tokens); the
projection is Linear -> Tanh -> Linear; the projected patch feature is L2-normalised and assigned to the
code of least squared distance, computed as |z|^2 + |e|^2 - 2 z.e as BEiT v2 does. Weights keep the
checkpoint's key names (`encoder.*`, `encode_task_layer.*`, `quantize.embedding.weight`); the decoder and
the EMA statistics are not needed to tokenize and are dropped on conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KEEP = ("encoder.", "encode_task_layer.", "quantize.embedding.weight")


@dataclass(frozen=True)
class VQKDConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    code_dim: int = 32
    k: int = 8192

    @classmethod
    def from_weights(cls, w: dict[str, torch.Tensor]) -> VQKDConfig:
        """Read the sizes off the tensors of a VQ-KD state dict (heads: 64-d heads, as every BEiT v2 ViT)."""
        dim, _, patch, _ = w["encoder.patch_embed.proj.weight"].shape
        n = w["encoder.pos_embed"].shape[1] - 1
        depth = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.blocks."))
        k, code_dim = w["quantize.embedding.weight"].shape
        grid = round(n**0.5)
        hidden = w["encoder.blocks.0.mlp.fc1.weight"].shape[0]
        return cls(grid * patch, patch, dim, depth, dim // 64, hidden / dim, code_dim, k)


class Block(nn.Module):
    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        D, self.heads = cfg.dim, cfg.heads
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn.q_bias = nn.Parameter(torch.zeros(D))
        self.attn.v_bias = nn.Parameter(torch.zeros(D))
        self.attn.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(D, int(D * cfg.mlp_ratio))
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(int(D * cfg.mlp_ratio), D)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        a = self.attn
        bias = torch.cat((a.q_bias, torch.zeros_like(a.v_bias), a.v_bias))  # no k bias
        qkv = F.linear(x, a.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return a.proj(y.transpose(1, 2).reshape(B, N, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VQKD(nn.Module):
    """(B, 3, S, S) views in [-1, 1] -> (B, G*G) int64 code ids."""

    def __init__(self, cfg: VQKDConfig):
        super().__init__()
        self.cfg, D, G = cfg, cfg.dim, cfg.image_size // cfg.patch_size
        self.encoder = nn.Module()
        self.encoder.patch_embed = nn.Module()
        self.encoder.patch_embed.proj = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size)
        self.encoder.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.encoder.pos_embed = nn.Parameter(torch.zeros(1, G * G + 1, D))
        self.encoder.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.encoder.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.encode_task_layer = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, cfg.code_dim))
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Module()
        self.quantize.embedding.weight = nn.Parameter(torch.zeros(cfg.k, cfg.code_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, G*G, code_dim) L2-normalised projections of the patch tokens."""
        e = self.encoder
        h = e.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, G*G, D)
        h = torch.cat((e.cls_token.expand(h.shape[0], -1, -1), h), dim=1) + e.pos_embed  # (B, 1+G*G, D)
        for blk in e.blocks:
            h = blk(h)
        h = e.fc_norm(h[:, 1:])  # (B, G*G, D) patch tokens
        with torch.autocast(x.device.type, enabled=False):  # BEiT v2 projects in float32
            return F.normalize(self.encode_task_layer(h.to(self.encode_task_layer[-1].weight.dtype)), dim=-1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)  # (B, G*G, code_dim) float32
        B, L, C = z.shape
        z = z.reshape(B * L, C)
        e = self.quantize.embedding.weight.to(z.dtype)  # (K, code_dim)
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (B*G*G, K)
        return d.argmin(dim=1).view(B, L)


def preprocess(unit: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) views in [0, 1] -> [-1, 1], in BEiT v2's order of operations."""
    return unit * 255.0 / 127.5 - 1.0


def from_reference(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], VQKDConfig]:
    """The tensors `VQKD` needs out of a BEiT v2 VQ-KD state dict, and its sizes."""
    w = {k: v for k, v in state.items() if k.startswith(KEEP)}
    return w, VQKDConfig.from_weights(w)
