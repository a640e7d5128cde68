"""MaPeT: permuted visual-token prediction with two-stream attention and auxiliary positions.

The fast formulation (docs/pipeline.md). Each sample is gathered into its factorisation order
(CLS first, then a random permutation of the patches); positions enter only through the gathered position
embeddings, so the visibility mask is the same for every sample: one static boolean mask, built once. With
c context tokens (CLS + 25% of the patches) and P = N - c predicted patches, the rows of a block are laid out

    [0, c)          context tokens (content stream)       sees: context + all mask tokens
    [c, c+P)        mask tokens (content stream)          sees: context + all mask tokens
    [c+P, c+2P)     target t = 0..P-1 (content stream)    sees: context + mask tokens > t + targets <= t
    [c+2P, c+3P)    query t (query stream; never a key)   sees: context + mask tokens >= t + targets < t

and keys / values are the content stream's c + 2P rows. A mask token is one learned vector plus the position
embedding of its target (MPNet-style auxiliary positions, paper Sec. 3.2): every prediction sees the positions
of all N tokens, as in fine-tuning. The first c + P rows never see a target, so they form a closed group that
attends densely to its own c + P keys (no mask: the unmasked fused kernel); only the other 2P rows need the
mask. In the last block only the query rows are computed: nothing reads the content stream after it. Both
streams share every weight. Loss: cross-entropy of all P query outputs (-> LayerNorm -> Linear(D, K)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.masked_attention import MaskedAttention
from pretrain.token_loss import token_loss
from pretrain.vit import (
    Block,
    VisionTransformer,
    ViTConfig,
    add_drop_path,
    block_draws,
    compute_dtype,
    run_block,
    scaled,
)


def default_context(num_patches: int) -> int:
    """c = CLS + 25% of the patches: 50 for the paper's 196 (Sec. 4.1, 75% of patches predicted)."""
    return 1 + round(0.25 * num_patches)


def visibility_mask(c: int, P: int) -> torch.Tensor:
    """The static two-stream mask in the layout above: (c+3P, c+2P) bool, True where a row may attend."""
    assert c >= 1 and P >= 1, f"context {c} and predictions {P} must be >= 1"
    t = torch.arange(P)
    m = torch.zeros(c + 3 * P, c + 2 * P, dtype=torch.bool)
    m[:, :c] = True  # everyone sees the context
    m[: c + P, c : c + P] = True  # context and mask-token rows: all mask tokens, no target
    tgt, qry = slice(c + P, c + 2 * P), slice(c + 2 * P, c + 3 * P)
    m[tgt, c : c + P] = t[None, :] > t[:, None]  # target t: mask tokens after t
    m[tgt, c + P :] = t[None, :] <= t[:, None]  # target t: targets up to t
    m[qry, c : c + P] = t[None, :] >= t[:, None]  # query t: mask tokens t and after
    m[qry, c + P :] = t[None, :] < t[:, None]  # query t: targets before t
    return m


class Rows(NamedTuple):
    """How a block's c + 3P rows split: the first `dense` (context and content mask tokens, c + P) attend
    densely to their own keys; the first `keys` (c + 2P) are the keys and values; the last `queries` (P) are
    the query stream."""

    dense: int
    keys: int
    queries: int


def two_stream_block(
    blk: Block,
    x: torch.Tensor,
    rows: Rows,
    masks,
    flex=None,
    last: bool = False,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """One shared-weight block over both streams. x (B, c+3P, D) in the layout above -> (B, c+3P, D), or
    (B, P, D) query rows only when `last`; rows: the layout's row groups (Rows);
    masks = (group-B mask (2P, c+2P), query mask (P, c+2P)): bool tensors, or BlockMasks with `flex`;
    u (B, 2): the sample's drop-path draws, shared by its two streams (or None: pretrain.vit.add_drop_path)."""
    a, s, P = rows
    attn = blk.attn
    B, L, D = x.shape
    H, Dh = attn.heads, attn.dh
    y = compute_dtype(blk.norm1(x))  # (B, L, D)
    k, v = attn.kv(y[:, :s]).view(B, s, 2, H, Dh).permute(2, 0, 3, 1, 4)  # 2 x (B, H, c+2P, Dh)
    sdpa = F.scaled_dot_product_attention if flex is None else flex
    w, b = scaled(attn.proj, blk.ls1.gamma)  # LayerScale folded into the output projection

    def proj(o):  # (B, H, n, Dh) -> (B, n, D); per attention call, so no concatenated copy is kept
        return F.linear(o.transpose(1, 2).reshape(B, -1, D), w, b)

    if last:
        q = attn.q(y[:, L - P :]).view(B, P, H, Dh).transpose(1, 2)  # (B, H, P, Dh)
        o = proj(sdpa(q, k, v, **{"block_mask" if flex else "attn_mask": masks[1]}))  # (B, P, D)
        x = x[:, L - P :]  # (B, P, D)
    else:
        # split, not indexed: backward joins the two query gradients in one copy instead of padding each
        q_a, q_b = attn.q(y).view(B, L, H, Dh).transpose(1, 2).split([a, L - a], dim=2)  # (B, H, ., Dh)
        o_a = F.scaled_dot_product_attention(q_a, k[:, :, :a], v[:, :, :a])  # (B, H, c+P, Dh) dense
        o_b = sdpa(q_b, k, v, **{"block_mask" if flex else "attn_mask": masks[0]})  # (B, H, 2P, Dh)
        o = torch.cat([proj(o_a), proj(o_b)], dim=1)  # (B, L, D)
    u1, u2 = (None, None) if u is None else u.unbind(1)
    x = add_drop_path(x, o, blk.drop_path, blk.training, u1)
    return add_drop_path(x, blk.mlp(blk.norm2(x), blk.ls2), blk.drop_path, blk.training, u2)


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
        c, P = self.num_context, self.num_predict
        mask = visibility_mask(c, P)
        # the first c + P rows attend densely to exactly the first c + P keys: no mask needed there
        assert mask[: c + P, : c + P].all() and not mask[: c + P, c + P :].any()
        self.register_buffer("mask_b", mask[c + P :], persistent=False)  # (2P, c+2P)
        self.attention = MaskedAttention(attn_backend)

    def attention_args(self, device: torch.device) -> tuple:
        """(masks, flex) of the masked attention calls on `device` (pretrain.masked_attention)."""
        return self.attention(self.mask_b, self.num_predict, device)

    def features(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        orders: torch.Tensor,
        drop: torch.Tensor | None = None,
    ):
        """images (B, 3, S, S); targets (B, G*G) int64 token ids (row-major); orders (B, G*G) permutations;
        drop (B, depth, 2) float drop-path draws, or None (pretrain.vit.add_drop_path).

        Returns the query stream's normalised outputs (B, P, D), the head's input, and the targets in
        prediction order (B, P).
        """
        enc, c, P = self.encoder, self.num_context, self.num_predict
        B, D = images.shape[0], enc.cfg.dim
        pos = enc.pos_embed.expand(B, -1, -1)  # (B, N, D)
        idx = orders[..., None].expand(-1, -1, D)  # (B, G*G, D)
        patches = enc.embed_patches(images).gather(1, idx) + pos[:, 1:].gather(1, idx)  # (B, G*G, D) in order
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        masks = self.mask_token + pos[:, 1:].gather(1, idx[:, c - 1 :])  # (B, P, D): target positions
        # (B, c+3P, D): context | mask tokens | targets | queries (= the mask tokens again)
        x = torch.cat([cls, patches[:, : c - 1], masks, patches[:, c - 1 :], masks], dim=1)
        attn_masks, flex = self.attention_args(images.device)
        rows = Rows(dense=c + P, keys=c + 2 * P, queries=P)
        last = len(enc.blocks) - 1
        for i, blk in enumerate(enc.blocks):
            x = run_block(
                enc,
                two_stream_block,
                blk,
                x,
                rows,
                attn_masks,
                flex,
                last=i == last,
                u=block_draws(drop, i),
            )  # (B, c+3P, D); last: (B, P, D)
        return enc.norm(x), targets.gather(1, orders[:, c - 1 :])  # (B, P, D), (B, P)

    def forward(self, images, targets, orders, drop=None):
        """Logits (B, P, K) of the P predictions and their targets (B, P)."""
        x, y = self.features(images, targets, orders, drop)
        return self.head(x), y

    def loss(self, images, targets, orders, drop=None):
        """Mean cross-entropy over all P predictions, and token top-1 accuracy (the pre-training metric),
        without materialising the logits (pretrain.token_loss)."""
        x, y = self.features(images, targets, orders, drop)
        return token_loss(x, self.head, y)
