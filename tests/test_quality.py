"""What codes say (tokenkit/quality.py): NMI and AMI equal scikit-learn's; purity by hand; stores compared."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from tokenkit.errors import StoreError
from tokenkit.quality import compare, contingency, label_quality, partition_scores, purity
from tokenkit.store import TokenStore
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig


@pytest.mark.parametrize(
    "n,ka,kb,mix",
    [(40, 5, 3, 0.0), (500, 16, 4, 0.5), (3000, 64, 2, 0.9), (20000, 256, 10, 0.3), (200, 7, 7, 1.0)],
)
def test_nmi_and_ami_equal_scikit_learn(n, ka, kb, mix):
    """Random partitions, partly dependent (mix: the share of positions whose second label follows the
    first), from independent to identical; AMI's expected MI is summed exactly, as scikit-learn does."""
    rng = np.random.default_rng(n)
    a = rng.integers(0, ka, n)
    b = np.where(rng.random(n) < mix, a % kb, rng.integers(0, kb, n))
    s = partition_scores(contingency(a, b, ka, kb))
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
    assert s["ami"] == pytest.approx(adjusted_mutual_info_score(a, b), abs=1e-10)


def test_purity_is_the_majority_share():
    table = np.array([[5, 1, 0], [0, 0, 4], [2, 2, 1]])
    assert purity(table) == pytest.approx((5 + 4 + 2) / 15)
    assert purity(np.eye(3, dtype=int)) == 1


def test_label_quality_and_compare_on_stores(tmp_path, photos, codebook_path):
    cfg = TokenizeConfig(views=ViewConfig(views=2, mode="random", seed=0), shard_size=5, workers=0)
    tokenize(photos, codebook_path, tmp_path / "a", cfg, progress=False)
    a = TokenStore.open(tmp_path / "a")
    q = label_quality(a)
    tokens = np.concatenate([t for t, _, _ in a.blocks(size=5)])  # (12, 2, 4, 4)
    labels = np.repeat(a.read(np.arange(12))["labels"], 2 * 16)
    want = partition_scores(contingency(tokens.reshape(-1), labels, a.k, 2))
    assert q["positions"] == 12 * 2 * 16 and q["nmi"] == pytest.approx(want["nmi"])
    assert q["purity"] == pytest.approx(purity(contingency(tokens.reshape(-1), labels, a.k, 2)))
    assert q["majority_label_share"] == 0.5
    # the same images, views and tokenizer as a webdataset-only store: everything agrees
    tokenize(
        photos,
        codebook_path,
        tmp_path / "b",
        TokenizeConfig(**{**cfg.__dict__, "format": "wds"}),
        progress=False,
    )
    r = compare(a, TokenStore.open(tmp_path / "b"))
    assert r["agreement"] == 1 and r["purity_a_to_b"] == 1 and r["ami"] == pytest.approx(1)
    # other views: refused, naming the fix
    other = TokenizeConfig(**{**cfg.__dict__, "views": ViewConfig(views=2, mode="random", seed=5)})
    tokenize(photos, codebook_path, tmp_path / "c", other, progress=False)
    with pytest.raises(StoreError, match="same --views, --view, --seed"):
        compare(a, TokenStore.open(tmp_path / "c"))
