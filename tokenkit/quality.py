"""How much a tokenizer's codes say: about the images' labels (`inspect --labels`), and about another
tokenizer's codes on the same views (`compare`).

Both read the codes as a clustering of the token positions of a store (every view's every patch) and
compare it with a second partition of the same positions: the label of the position's image, or the other
store's code at the same view and patch. From the contingency table n_ij (positions with code i and
label / other code j):
- mutual information I (nats); NMI = I / mean(H_codes, H_other) (the arithmetic mean, scikit-learn's
  default); AMI = (I - E[I]) / (mean(H) - E[I]), E[I] the expected I of two random partitions with the
  same cluster sizes (hypergeometric model, Vinh et al. 2010), summed exactly over the terms within 12
  standard deviations of each cell's mean;
- purity: the share of positions whose code's most common label (or other code) is theirs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tokenkit.errors import StoreError
from tokenkit.store import TokenStore


def contingency(a: np.ndarray, b: np.ndarray, ka: int, kb: int) -> np.ndarray:
    """(ka, kb) int64 counts of the pairs (a[t], b[t]); a and b int arrays of the same length."""
    return np.bincount(a.astype(np.int64) * kb + b, minlength=ka * kb).reshape(ka, kb)


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(table: np.ndarray) -> float:
    n = table.sum()
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    a, b = table.sum(1).astype(np.float64), table.sum(0).astype(np.float64)
    return float((nij / n * np.log(n * nij / (a[i] * b[j]))).sum())


def expected_mutual_information(table: np.ndarray, block: int = 1 << 22) -> float:
    """E[I] over random partitions with the table's marginals (the hypergeometric model), in nats."""
    N = float(table.sum())
    a = torch.from_numpy(table.sum(1)[table.sum(1) > 0].astype(np.float64))
    b = torch.from_numpy(table.sum(0)[table.sum(0) > 0].astype(np.float64))
    A, B = torch.meshgrid(a, b, indexing="ij")
    A, B = A.reshape(-1), B.reshape(-1)
    mean = A * B / N
    sd = torch.sqrt(A * B * (N - A) * (N - B) / (N * N * max(N - 1, 1)))
    lo = torch.maximum(torch.maximum(torch.ones_like(A), A + B - N), torch.floor(mean - 12 * sd))
    hi = torch.minimum(torch.minimum(A, B), torch.ceil(mean + 12 * sd))
    width = (hi - lo + 1).clamp_min(0)
    lg = torch.lgamma
    const = lg(A + 1) + lg(B + 1) + lg(N - A + 1) + lg(N - B + 1) - math.lgamma(N + 1)
    total, pos = 0.0, 0
    W = int(width.max().item()) if len(width) else 0
    step = max(1, block // max(W, 1))
    while pos < len(A):
        s = slice(pos, pos + step)
        n = lo[s, None] + torch.arange(W, dtype=torch.float64)  # (pairs, W) candidate cell counts
        ok = n <= hi[s, None]
        n = torch.where(ok, n, torch.ones_like(n))  # masked terms are computed at n = 1 and dropped
        a_, b_ = A[s, None], B[s, None]
        log_p = const[s, None] - lg(n + 1) - lg(a_ - n + 1) - lg(b_ - n + 1) - lg(N - a_ - b_ + n + 1)
        term = n / N * torch.log(N * n / (a_ * b_)) * torch.exp(log_p)
        total += float(torch.where(ok, term, torch.zeros_like(term)).sum())
        pos += step
    return total


def purity(table: np.ndarray) -> float:
    """Share of positions whose row (code) has their column as its most common one."""
    return float(table.max(axis=1).sum() / max(table.sum(), 1))


def partition_scores(table: np.ndarray) -> dict:
    """NMI, AMI, mutual information and both entropies of a contingency table."""
    mi, ha, hb = mutual_information(table), entropy(table.sum(1)), entropy(table.sum(0))
    emi, mean_h = expected_mutual_information(table), (ha + hb) / 2
    return {
        "mutual_information": mi,
        "entropy_codes": ha,
        "entropy_other": hb,
        "nmi": mi / mean_h if mean_h > 0 else 1.0,
        "ami": (mi - emi) / (mean_h - emi) if mean_h - emi > 1e-15 else 1.0,
    }


def label_quality(store: TokenStore) -> dict:
    """What the codes of a labelled store say about its images' labels (unlabelled images left out)."""
    L = len(store.classes)
    if L < 2:
        raise StoreError(
            f"{store.root}: {L} labelled classes; --labels needs a store of class folders (or tars with .cls)"
        )
    table = np.zeros((store.k, L), np.int64)
    for tokens, labels, _ in store.blocks():
        keep = labels >= 0
        per = tokens[keep].reshape(int(keep.sum()), -1)  # (b, V*G*G)
        lab = np.repeat(labels[keep], per.shape[1])
        table += contingency(per.reshape(-1), lab, store.k, L)
    if table.sum() == 0:
        raise StoreError(f"{store.root}: no labelled image; --labels needs labels")
    shares = table.sum(0) / table.sum()
    return {
        **partition_scores(table),
        "purity": purity(table),
        "majority_label_share": float(shares.max()),  # the purity of a tokenizer whose codes say nothing
        "labels": L,
        "positions": int(table.sum()),
    }


def compare(a: TokenStore, b: TokenStore) -> dict:
    """Two stores of the same images and views: where their codes agree, and what one says of the other."""
    if a.num_views != b.num_views or a.grid != b.grid or len(a) != len(b):
        raise StoreError(
            f"{b.root}: {len(b)} images x {b.num_views} views x {b.grid}^2, but {a.root} has {len(a)} x "
            f"{a.num_views} x {a.grid}^2; compare stores tokenized from the same images with the same views"
        )
    table = np.zeros((a.k, b.k), np.int64)
    same = 0
    for (ta, _, ka), (tb, _, kb) in zip(a.blocks(), b.blocks(), strict=True):
        if ka["keys"] != kb["keys"] or not np.array_equal(ka["views"], kb["views"]):
            raise StoreError(
                f"{b.root}: its images or view boxes differ from {a.root}'s; tokenize the same images with the "
                "same --views, --view, --seed"
            )
        same += int((ta == tb).sum())
        table += contingency(ta.reshape(-1), tb.reshape(-1), a.k, b.k)
    n = int(table.sum())
    return {
        **partition_scores(table),
        "agreement": same / n,  # the same id: meaningful for one tokenizer run two ways (device, precision)
        "purity_a_to_b": purity(table),  # a's codes predicting b's by majority
        "purity_b_to_a": purity(table.T),
        "positions": n,
        "k_a": a.k,
        "k_b": b.k,
    }
