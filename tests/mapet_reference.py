"""A dense, per-sample reference of MaPeT's two-stream attention, written from the method's description.

It never permutes the sequence: tokens stay in their original (CLS, row-major patch) order, and each sample
gets its own visibility mask from the ranks of its factorisation order, the way the official code builds
dense per-sample masks in its data loader. Attention is explicit math (softmax(q k^T / sqrt(Dh)) v). The
fast path (pretrain/mapet.py) must match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.mapet import MaPeT


def per_sample_mask(order: torch.Tensor, c: int) -> torch.Tensor:
    """order (G*G,) -> (N+2P, N+P) bool mask over [original tokens; mask tokens; queries] x [tokens; mask tokens]."""
    n = order.numel() + 1
    P = n - c
    rank = torch.empty(n, dtype=torch.long)
    rank[0] = 0  # CLS is always first in the order
    rank[1 + order] = torch.arange(1, n)
    is_ctx = rank < c
    tgt = rank - c  # target index of each original token (negative for context)
    k = torch.arange(P)
    m = torch.zeros(n + 2 * P, n + P, dtype=torch.bool)
    for i in range(n):  # content rows, original order
        m[i, :n] = is_ctx | ((~is_ctx) & (tgt <= tgt[i]) & ~is_ctx[i])
        m[i, n:] = True if is_ctx[i] else k > tgt[i]
    for j in range(P):  # mask-token rows (content stream)
        m[n + j, :n] = is_ctx
        m[n + j, n:] = True
    for j in range(P):  # query rows
        m[n + P + j, :n] = is_ctx | ((~is_ctx) & (tgt < j))
        m[n + P + j, n:] = k >= j
    return m


def reference_logits(
    model: MaPeT, images: torch.Tensor, orders: torch.Tensor, branch_scales: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, P, K) logits of the query stream, one sample at a time, unpermuted. branch_scales (depth, 2, B):
    the factor of each block's attention and MLP branch per sample (stochastic depth: 0 or 1 / (1 - p)),
    applied to every row of the sample, both streams; None: 1 (no drop path)."""
    enc, c, N, P = model.encoder, model.num_context, model.num_tokens, model.num_predict
    out = []
    for b in range(images.shape[0]):
        tokens = enc.prepend_cls(enc.embed_patches(images[b : b + 1]))[0]  # (N, D) original order
        target_ids = orders[b, c - 1 :]  # patch indices of the P targets, in prediction order
        masks = model.mask_token[0, 0] + enc.pos_embed[0, 1 + target_ids]  # (P, D)
        x = torch.cat([tokens, masks, masks])  # (N+2P, D)
        m = per_sample_mask(orders[b].cpu(), c).to(x.device)
        for i, blk in enumerate(enc.blocks):
            a = blk.attn
            y = blk.norm1(x)
            q = a.q(y).view(-1, a.heads, a.dh).transpose(0, 1)  # (H, L, Dh)
            kv = a.kv(y[: N + P]).view(N + P, 2, a.heads, a.dh)
            k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # (H, S, Dh)
            s = (q @ k.transpose(1, 2)) / a.dh**0.5  # (H, L, S)
            s = s.masked_fill(~m, float("-inf"))
            o = (s.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)  # (L, D)
            s1, s2 = (1.0, 1.0) if branch_scales is None else branch_scales[i, :, b]
            x = x + s1 * blk.ls1.gamma * a.proj(o)
            x = x + s2 * blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        out.append(model.head(enc.norm(x[N + P :])))
    return torch.stack(out)
