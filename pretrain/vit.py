"""The ViT encoder shared by MaPeT, BEiT, probing and fine-tuning.

BEiT/MaPeT-style ViT/16: learned absolute position embeddings (no relative bias), LayerScale, separate q and
kv linears with bias (MaPeT's query stream takes queries from rows that are not keys), LayerNorm eps 1e-6,
timm init (trunc_normal std .02). MaPeT's two-stream forward reuses these blocks' weights
(pretrain.mapet.two_stream_block).

Shapes: B batch, N tokens (CLS + G*G patches), D width, H heads, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenkit.errors import MAX_SIDE


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    layer_scale: float = 0.1  # MaPeT / BEiT pre-training value
    drop_path: float = 0.1
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


# Presets: ViT-T/S/B at 224 / 16 (the paper's), and a micro model for CPU runs and the quickstart.
PRESETS = {
    "mapet_micro": dict(image_size=112, patch_size=16, dim=128, depth=4, heads=4),
    "mapet_tiny": dict(image_size=224, patch_size=16, dim=192, depth=12, heads=3),
    "mapet_small": dict(image_size=224, patch_size=16, dim=384, depth=12, heads=6),
    "mapet_base": dict(image_size=224, patch_size=16, dim=768, depth=12, heads=12),
}


def add_drop_path(
    x: torch.Tensor, branch: torch.Tensor, p: float, training: bool, u: torch.Tensor | None = None
) -> torch.Tensor:
    """x + drop_path(branch): stochastic depth, one draw per sample, a kept branch scaled by 1 / (1 - p).
    Both MaPeT streams are rows of the same sample's tensor, so they share the draw, as the paper's
    implementation does. u (B,) float: the samples' uniform draws, a branch kept where u < 1 - p (the
    trainers draw them per sample in the loader: pretrain.data.SampleDraws); None: drawn here, on x's device.
    One fused pass (addcmul) with the scale in x's dtype."""
    if p == 0.0 or not training:
        return x + branch
    shape = (x.shape[0], *([1] * (x.ndim - 1)))  # (B, 1, 1)
    if u is None:
        scale = x.new_empty(shape).bernoulli_(1 - p)
    else:
        scale = (u < 1 - p).to(x.dtype).view(shape)
    return torch.addcmul(x, branch, scale.div_(1 - p))


def drop_path_draws(rng: np.random.Generator, depth: int) -> torch.Tensor:
    """One sample's drop-path draws for a `depth`-block encoder: (depth, 2) float32 uniforms, the attention
    and MLP branches of each block (add_drop_path keeps a branch where u < 1 - rate). The trainers draw them
    in the loader from the sample's keyed generator."""
    return torch.from_numpy(rng.random((depth, 2), dtype=np.float32))


def compute_dtype(y: torch.Tensor) -> torch.Tensor:
    """y in autocast's compute dtype, cast once: the q and kv projections then save one shared bf16 copy of
    their input for backward instead of casting (and keeping) one each."""
    dev = y.device.type
    return y.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else y


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that keeps only h for backward and recomputes gelu(h) there: the GELU
    output (4D per token) is not stored. Same arithmetic as GELU followed by Linear, in h's dtype."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(F.gelu(h), weight.to(h.dtype), None if bias is None else bias.to(h.dtype))

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        gw = (g2.T @ F.gelu(h).reshape(-1, h.shape[-1])).to(weight.dtype)  # (out, hidden)
        gb = None if ctx.bias_dtype is None else g2.sum(0).to(ctx.bias_dtype)
        gh = torch.ops.aten.gelu_backward(grad @ weight.to(grad.dtype), h)  # (..., hidden)
        return gh, gw, gb


def scaled(lin: nn.Linear, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerScale folded into a linear layer: (weight, bias) of gamma * lin(x). gamma's gradient flows
    through the folded weight, so the layer's output is not kept for backward as gamma * out would keep it.
    Same parameters and the same function (rounding aside)."""
    return gamma[:, None] * lin.weight, gamma * lin.bias


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT), initialised at `init`. Its user folds it into
    the branch's last linear layer (see scaled) rather than multiplying the branch's output."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))


class Mlp(nn.Module):
    """ls(fc2(gelu(fc1(x)))), with the GELU recomputed in backward (its 4D-wide output is not stored:
    _GeluLinear) and the LayerScale folded into fc2 (see scaled)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, ls: LayerScale) -> torch.Tensor:
        return _GeluLinear.apply(self.fc1(x), *scaled(self.fc2, ls.gamma))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} not divisible by heads {heads}"
        self.heads, self.dh = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ls: LayerScale) -> torch.Tensor:
        """x (B, N, D) -> ls(proj(attention)) (B, N, D), every token attending to every token (fused SDPA);
        the LayerScale is folded into the projection (see scaled)."""
        B, N, D = x.shape
        x = compute_dtype(x)
        q = self.q(x).view(B, N, self.heads, self.dh).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(x).view(B, N, 2, self.heads, self.dh).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, Dh)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return F.linear(o.transpose(1, 2).reshape(B, N, D), *scaled(self.proj, ls.gamma))  # (B, N, D)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        D = cfg.dim
        # the LayerScales first: the parameters' order sets the gradient norm's summation order, kept as it was
        self.ls1 = LayerScale(D, cfg.layer_scale)
        self.ls2 = LayerScale(D, cfg.layer_scale)
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps)
        self.attn = Attention(D, cfg.heads)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.drop_path = drop_path_rate

    def forward(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); u (B, 2) the drop-path draws of the attention and MLP branches (or None,
        see add_drop_path). MaPeT runs the same weights through pretrain.mapet.two_stream_block."""
        u1, u2 = (None, None) if u is None else u.unbind(1)
        x = add_drop_path(
            x, self.attn(self.norm1(x), self.ls1), self.drop_path, self.training, u1
        )  # x + dp(ls1(attn))
        return add_drop_path(x, self.mlp(self.norm2(x), self.ls2), self.drop_path, self.training, u2)


def block_draws(drop: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Block i's (B, 2) drop-path draws of (B, depth, 2) ones, or None (drawn in the block)."""
    return None if drop is None else drop[:, i]


def run_block(enc: VisionTransformer, fn, *args, **kw):
    """fn(*args, **kw): one block of `enc`. With enc.grad_checkpointing (and gradients on) its activations are
    recomputed in backward, so the block keeps only its input: far less memory for about a third more compute.
    The recomputation replays the block's random draws (drop path), so loss and gradients are unchanged."""
    if enc.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kw)
    return fn(*args, **kw)


class VisionTransformer(nn.Module):
    """ViT encoder. `forward_features` -> (B, N, D) normalised tokens; `forward_head` pools for probing.
    grad_checkpointing: recompute each block in backward (see run_block); off by default."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        D, P = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=P, stride=P)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()  # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, G*G, D) patch embeddings, row-major over the grid (no positions yet)."""
        return self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, G*G, D)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G*G, D) patch embeddings -> (B, N, D) with CLS first and absolute positions added."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N, D)

    def forward_features(self, images: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, S, S) -> (B, N, D); drop (B, depth, 2) float: each block's drop-path draws (Block)."""
        x = self.prepend_cls(self.embed_patches(images))  # (B, N, D)
        for i, blk in enumerate(self.blocks):
            x = run_block(self, blk, x, u=block_draws(drop, i))
        return self.norm(x)  # (B, N, D)

    def forward_head(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """(B, N, D) -> (B, D): mean of the patch tokens ("avg"), CLS ("cls"), or both concatenated."""
        if pool == "cls":
            return x[:, 0]
        if pool == "avg":
            return x[:, 1:].mean(1)
        return torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=-1)  # (B, 2D)


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) learned positions -> (1, 1 + grid*grid, D): the patch positions resampled as an image
    (bicubic, antialiased, as timm and DeiT do for a new resolution), the CLS position kept."""
    g = math.isqrt(pos.shape[1] - 1)
    if g == grid:
        return pos
    x = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :1], x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def at_image_size(enc: VisionTransformer, image_size: int) -> VisionTransformer:
    """The same encoder for inputs of image_size (a multiple of its patch size): positions resampled
    (resize_pos_embed), every other weight shared."""
    cfg = enc.cfg
    if image_size == cfg.image_size:
        return enc
    out = VisionTransformer(replace(cfg, image_size=image_size))
    state = enc.state_dict()
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], out.cfg.grid)
    out.load_state_dict(state)
    return out.train(enc.training)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def size_checks(image_size: int | None, patch_size: int | None) -> tuple:
    """require() entries for --image-size / --patch-size: left out (None: the preset's or the weights') or in
    [1, 8192]."""
    return (
        (
            "--image-size",
            image_size,
            image_size is None or 1 <= image_size <= MAX_SIDE,
            f"in [1, {MAX_SIDE}]",
        ),
        (
            "--patch-size",
            patch_size,
            patch_size is None or 1 <= patch_size <= MAX_SIDE,
            f"in [1, {MAX_SIDE}]",
        ),
    )
