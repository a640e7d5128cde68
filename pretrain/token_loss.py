"""The pre-training loss: cross-entropy of a K-way linear head over visual tokens, without keeping logits.

MaPeT predicts 147 tokens per image over K = 8192 classes: the logits are the largest tensor of the step
(a float32 copy of them, the log-softmax kept for backward, its gradient: at ViT-B, batch 128, ~2 GiB on
their own). `token_loss` computes head, log-softmax, loss and token top-1 over blocks of rows and, while a
block's logits are at hand, the gradients of the head's input, weight and bias; backward only scales them.
Same loss and gradients as F.cross_entropy(head(x), y) (fp64 test), rows whose target is IGNORE left out
of the mean (BEiT pads its predictions to a fixed count with them); what is kept for backward is the
input's gradient (M, D) and the head's (K, D), not (M, K). Under autocast the products run in autocast's
dtype and the softmax in float32, as autocast runs the unfused head and cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # a target that takes no part in the loss or the accuracy (F.cross_entropy's ignore_index)


def rows_per_block(k: int, device: torch.device) -> int:
    """Rows whose float32 logits fit in ~16 MiB on CPU, ~64 MiB on a GPU (few launches). On the CPU, 512 rows
    at K 8192 ran 3-5% faster than 256 (forward + backward, widths 192 to 768, 2 cores) and no slower than
    1024: larger blocks read the head's weight fewer times."""
    budget = 2**24 if device.type == "cuda" else 2**22
    return max(1, budget // k)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, dtype, rows):
        """x (M, D), weight (K, D), bias (K,), target (M,) int64 -> (mean loss over the rows whose target is
        not IGNORE, number of correct top-1, number of such rows). No host sync: the count stays a tensor."""
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(dtype, torch.float32)
        xs, w, b = x.to(dtype), weight.to(dtype), bias.to(dtype)
        valid = target != IGNORE  # (M,)
        n = valid.sum()  # rows in the mean
        scale = valid.to(acc) / n  # (M,) d(mean loss) / d(row loss)
        target = target.clamp_min(0)  # ignored rows: any class, their terms are zeroed below
        # every sum is built out of place: under --compile an in-place update of a tensor saved for backward
        # can reach backward as the value it had when saved (zeros: docs/benchmarks.md)
        loss = torch.zeros((), dtype=acc, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        gw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=acc, device=x.device) if need_b else None
        gx = []  # (m, D) blocks
        for s in range(0, x.shape[0], rows):
            xc, tc, vc, sc = xs[s : s + rows], target[s : s + rows], valid[s : s + rows], scale[s : s + rows]
            z = torch.addmm(b, xc, w.t()).to(acc)  # (m, K) logits of this block
            zt = z.gather(1, tc[:, None])[:, 0]  # (m,) the targets' logits
            top, pred = z.max(1)  # (m,) the row maxima and their first indices, one pass
            correct = correct + ((pred == tc) & vc).sum()
            z.sub_(top[:, None]).exp_()  # in place, one pass each (logsumexp would take its own copies)
            total = z.sum(1)  # (m,)
            loss = loss + ((top + total.log() - zt) * sc).sum()  # log-sum-exp minus the target's logit
            if need_x or need_w or need_b:
                z.mul_((sc / total)[:, None])  # softmax, scaled: d(mean loss) / d logits ...
                z.scatter_add_(1, tc[:, None], -sc[:, None])  # ... minus the scaled one-hot
                g = z.to(dtype)
                if need_x:
                    gx.append(g @ w)
                if need_w:
                    gw = gw + (g.t() @ xc).to(acc)
                if need_b:
                    gb = gb + z.sum(0)
        gx = (torch.cat(gx).to(x.dtype) if gx else torch.zeros_like(x)) if need_x else None
        ctx.save_for_backward(gx, gw, gb)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(correct, n)
        return loss, correct, n

    @staticmethod
    def backward(ctx, grad, *_):
        saved = zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        grads = [None if g is None else (g * grad).to(dt) for g, dt in saved]
        return *grads, None, None, None


def token_loss(
    x: torch.Tensor, head: nn.Linear, target: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of head(x) against target, and token top-1 accuracy (no gradient).

    x (..., D) features, target (...) int64 token ids or IGNORE, rows per block (default: rows_per_block).
    Equals F.cross_entropy(head(x).flatten(0, -2).float(), target.flatten(), ignore_index=IGNORE) with
    (head(x).argmax(-1) == target) averaged over the rows not ignored, without keeping the logits.
    """
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x2, t = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    with torch.autocast(dev, enabled=False):
        loss, correct, n = _LinearCrossEntropy.apply(
            x2, head.weight, head.bias, t, dtype, rows or rows_per_block(head.out_features, x.device)
        )
    return loss, correct.float() / n
