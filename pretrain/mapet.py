"""MaPeT: permuted visual-token prediction with two-stream attention and auxiliary positions.

The fast formulation (shared/design/ARCHITECTURE.md). Each sample is gathered into its factorisation order
(CLS first, then a random permutation of the patches); positions enter only through the gathered position
embeddings, so the visibility mask is the same for every sample: one static (N+2P) x (N+P) boolean mask,
built once. Rows / columns, for N tokens, c context tokens and P = N - c predicted patches:

    [0, c)         context tokens (content stream)            sees: context + all mask tokens
    [c, N)         target t = 0..P-1 (content stream)         sees: context + targets <= t + mask tokens > t
    [N, N+P)       mask tokens (content stream)               sees: context + all mask tokens
    [N+P, N+2P)    query t (query stream; rows, never keys)   sees: context + targets < t + mask tokens >= t

A mask token is one learned vector plus the position embedding of its target (MPNet-style auxiliary
positions, paper Sec. 3.2): every prediction sees the positions of all N tokens, as in fine-tuning. Both
streams share every weight and run in one attention call per block, keys and values from the content
stream's N+P rows. Loss: cross-entropy of all P query outputs (-> LayerNorm -> Linear(D, K)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.vit import VisionTransformer, ViTConfig


def default_context(num_patches: int) -> int:
    """c = CLS + 25% of the patches: 50 for the paper's 196 (Sec. 4.1, 75% of patches predicted)."""
    return 1 + round(0.25 * num_patches)


def visibility_mask(n: int, c: int) -> torch.Tensor:
    """The static two-stream mask: (N+2P, N+P) bool, True where a row may attend to a key."""
    assert 1 <= c < n, f"context {c} must be in [1, {n})"
    P = n - c
    t = torch.arange(P)
    m = torch.zeros(n + 2 * P, n + P, dtype=torch.bool)
    m[:, :c] = True  # everyone sees the context
    m[:c, n:] = True  # context rows: all mask tokens
    m[n : n + P, n:] = True  # mask-token rows: all mask tokens
    m[c:n, c:n] = t[None, :] <= t[:, None]  # target t: targets <= t
    m[c:n, n:] = t[None, :] > t[:, None]  # target t: mask tokens after t
    m[n + P :, c:n] = t[None, :] < t[:, None]  # query t: targets before t
    m[n + P :, n:] = t[None, :] >= t[:, None]  # query t: mask tokens t and after
    return m


def random_orders(batch: int, num_patches: int, generator: torch.Generator) -> torch.Tensor:
    """(B, G*G) int64: a fresh uniform permutation of the patch indices per sample."""
    return torch.rand(batch, num_patches, generator=generator).argsort(dim=1)


class MaPeT(nn.Module):
    def __init__(
        self, cfg: ViTConfig, vocab_size: int, num_context: int | None = None, attn_backend: str = "auto"
    ):
        super().__init__()
        self.encoder = VisionTransformer(cfg)
        self.num_tokens = 1 + cfg.num_patches  # N
        self.num_context = num_context or default_context(cfg.num_patches)  # c
        self.num_predict = self.num_tokens - self.num_context  # P
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(cfg.dim, vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mask", visibility_mask(self.num_tokens, self.num_context), persistent=False)
        self.attn_backend = attn_backend
        self._flex = None  # (device, compiled flex_attention, BlockMask), built on first CUDA forward

    def attention_args(self, device: torch.device) -> tuple:
        """(mask, flex): the BlockMask + compiled FlexAttention on CUDA, the boolean mask for SDPA elsewhere."""
        backend = self.attn_backend
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else "sdpa"
        if backend == "sdpa":
            return self.mask, None
        if self._flex is None or self._flex[0] != device:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            dense = self.mask.to(device)

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[q_idx, kv_idx]

            L, S = dense.shape
            block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=S, device=device)
            self._flex = (device, torch.compile(flex_attention, dynamic=False), block_mask)
        return self._flex[2], self._flex[1]

    def forward(self, images: torch.Tensor, targets: torch.Tensor, orders: torch.Tensor):
        """images (B, 3, S, S); targets (B, G*G) int64 token ids (row-major); orders (B, G*G) permutations.

        Returns logits (B, P, K) and the targets in prediction order (B, P).
        """
        enc, c, N, P = self.encoder, self.num_context, self.num_tokens, self.num_predict
        B, D = images.shape[0], enc.cfg.dim
        pos = enc.pos_embed.expand(B, -1, -1)  # (B, N, D)
        idx = orders[..., None].expand(-1, -1, D)  # (B, G*G, D)
        patches = enc.embed_patches(images).gather(1, idx) + pos[:, 1:].gather(1, idx)  # (B, G*G, D) in order
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        content = torch.cat([cls, patches], dim=1)  # (B, N, D): c context, then P targets in order
        masks = self.mask_token + pos[:, 1:].gather(1, idx[:, c - 1 :])  # (B, P, D): target positions
        x = torch.cat([content, masks, masks], dim=1)  # (B, N+2P, D): content stream, then query stream
        mask, flex = self.attention_args(images.device)
        for blk in enc.blocks:
            x = blk(x, kv_len=N + P, mask=mask, flex=flex)  # (B, N+2P, D)
        logits = self.head(enc.norm(x[:, N + P :]))  # (B, P, K)
        return logits, targets.gather(1, orders[:, c - 1 :])  # (B, P, K), (B, P)

    def loss(self, images, targets, orders):
        """Mean cross-entropy over all P predictions, and token top-1 accuracy (the pre-training metric)."""
        logits, y = self(images, targets, orders)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, acc
