"""The GPU paths: compiled FlexAttention with BlockMasks, bf16 training, CLIP under autocast, torch k-means.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

import numpy as np
import pytest
import torch

from pretrain.data import random_orders
from pretrain.mapet import MaPeT
from pretrain.train import TrainConfig, pretrain
from pretrain.vit import ViTConfig
from tests.mapet_reference import reference_logits
from tokenkit.kmeans import KMeansConfig, assign, fit
from tokenkit.store import TokenStore
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: no TF32 in matmuls or convolutions while a test compares against a reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def paper_sized_model(backend: str) -> MaPeT:
    """ViT/16 at 224 (N = 197, c = 50, P = 147: the paper's mask) with a narrow, shallow trunk."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=224, patch_size=16, dim=96, depth=2, heads=3, drop_path=0.0, layer_scale=1.0)
    return MaPeT(cfg, vocab_size=64, attn_backend=backend).to(CUDA)


def test_flex_path_matches_the_dense_reference_and_sdpa_gradients():
    model = paper_sized_model("flex")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 224, 224, generator=g).to(CUDA)
    targets = torch.randint(0, 64, (3, 196), generator=g).to(CUDA)
    orders = random_orders(3, 196, g).to(CUDA)
    flex, y = model(images, targets, orders)
    with torch.no_grad():
        ref = reference_logits(model, images, orders)
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    g_flex = torch.autograd.grad(torch.nn.functional.cross_entropy(flex.flatten(0, 1), y.flatten()), params)
    model.attention.backend = "sdpa"
    sdpa, _ = model(images, targets, orders)
    g_sdpa = torch.autograd.grad(torch.nn.functional.cross_entropy(sdpa.flatten(0, 1), y.flatten()), params)
    for a, b in zip(g_flex, g_sdpa, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bf16_flex_logits_stay_close_to_fp32():
    model = paper_sized_model("flex")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=g).to(CUDA)
    orders = random_orders(2, 196, g).to(CUDA)
    t = torch.zeros(2, 196, dtype=torch.long, device=CUDA)
    with torch.no_grad():
        ref, _ = model(images, t, orders)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _ = model(images, t, orders)
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 2e-2, f"bf16 relative error {err:.3g}"


def training_log(store, out, device="cuda", **settings) -> np.ndarray:
    """(steps, 2): loss and gradient norm at every step of a 12-step bf16 run of the micro model at a high
    learning rate, without drop path (no random draw differs between two runs); checks that it trained."""
    import json

    cfg = TrainConfig(
        tokens=str(store), out=str(out), model="mapet_micro", image_size=64, patch_size=16, batch_size=4,
        epochs=4, warmup_epochs=0, lr=5e-3, drop_path=0.0, workers=0, log_every=1, seed=0, device=device,
        precision="bf16", **settings,
    )  # fmt: skip
    pretrain(cfg, progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    log = np.array([[r["loss"], r["grad_norm"]] for r in map(json.loads, lines)])
    assert len(log) >= 6 and (log[:, 1] > 0).all()
    assert log[-1, 0] < log[0, 0]  # it trained
    return log


def test_bf16_training_on_cuda_learns_and_checkpoints(store_cuda, tmp_path):
    for objective in ("mapet", "beit"):
        cfg = TrainConfig(
            tokens=str(store_cuda), out=str(tmp_path / objective), model="mapet_micro", image_size=64,
            patch_size=16, batch_size=4, epochs=6, warmup_epochs=1, lr=2e-3, workers=0, log_every=1, seed=0,
            objective=objective, device="cuda",
        )  # fmt: skip
        last = pretrain(cfg, progress=False)
        ckpt = torch.load(last, weights_only=True, map_location="cpu")
        assert ckpt["objective"] == objective
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.fixture(scope="module")
def store_cuda(tmp_path_factory, photos, codebook_path):
    cfg = TokenizeConfig(views=ViewConfig(2, "random", seed=3), format="zarr", shard_size=8, workers=0)
    return tokenize(photos, codebook_path, tmp_path_factory.mktemp("cuda") / "tokens", cfg, progress=False)


def test_cuda_tokens_agree_with_cpu_tokens(photos, codebook_path, tmp_path):
    """Same codebook, same views: fp32 on the GPU gives the CPU's tokens up to rare near-ties; bf16 autocast
    (the default on CUDA) moves some features across Voronoi borders, and the share that stays is printed."""
    tokens = {}
    for dev, prec in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        cfg = TokenizeConfig(views=ViewConfig(2, "random", seed=3), shard_size=8, workers=0, device=dev,
                             precision=prec)  # fmt: skip
        out = tokenize(photos, codebook_path, tmp_path / f"{dev}-{prec}", cfg, progress=False)
        s = TokenStore.open(out)
        tokens[dev, prec] = s.read(np.arange(len(s)))["tokens"]
    fp32 = (tokens["cuda", "fp32"] == tokens["cpu", "fp32"]).mean()
    bf16 = (tokens["cuda", "bf16"] == tokens["cpu", "fp32"]).mean()
    print(f"token agreement with CPU fp32: CUDA fp32 {fp32:.4f}, CUDA bf16 {bf16:.4f}")
    assert fp32 >= 0.99
    assert bf16 >= 0.8


def test_torch_kmeans_on_cuda_is_within_one_percent_of_faiss_and_assigns_exactly():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(20000, 16)) * np.linspace(0.5, 2, 16)).astype(np.float32)
    cfg = dict(k=64, niter=20, nredo=2, seed=0)
    f = fit(x, KMeansConfig(backend="faiss", **cfg))
    t = fit(x, KMeansConfig(backend="torch", **cfg), device="cuda")
    assert t.backend == "torch-cuda"
    assert abs(t.objective - f.objective) / f.objective < 0.01
    # assignment on the GPU is the exact fp32 nearest centroid, the CPU's answer
    on_gpu = assign(torch.from_numpy(x).to(CUDA), t.centroids).cpu().numpy()
    assert np.array_equal(on_gpu, assign(x, t.centroids))


def test_a_journaled_kmeans_on_cuda_resumes_to_the_uninterrupted_fit(tmp_path, monkeypatch):
    """The torch backend on the GPU, killed in its second restart and resumed from its journal (centroids
    moved to and from the device), runs only the iterations left and reaches the uninterrupted fit's objective
    within 1% (bf16 distances and atomic cluster sums on the GPU: equal to rounding, not bit for bit)."""
    import tokenkit.kmeans as km

    x = (np.random.default_rng(3).normal(size=(20000, 16)) * np.linspace(0.5, 2, 16)).astype(np.float32)
    cfg = KMeansConfig(k=64, niter=6, nredo=2, seed=0, backend="torch")
    want = fit(x, cfg, device="cuda")
    journal = km.FitJournal(tmp_path / "cb.progress", {"k": 64}, every=0)
    real, calls = km._split_empty, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 9:  # restart 2, iteration 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(km, "_split_empty", dies)
    with pytest.raises(KeyboardInterrupt):
        fit(x, cfg, device="cuda", journal=journal)
    calls.clear()
    monkeypatch.setattr(km, "_split_empty", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = fit(x, cfg, device="cuda", journal=journal)
    assert len(calls) == 4  # the iterations left: restart 2's third to sixth
    assert got.backend == "torch-cuda" and got.objective == pytest.approx(want.objective, rel=1e-2)


def test_torch_kmeans_holds_float16_features_in_float16_on_the_gpu():
    """The paper's 4.2M x 4096 sample is 32 GiB in float16 (as stored), 64 GiB in float32: the torch backend
    must not up-cast it on the device (blocks of rows are converted one at a time)."""
    x = np.random.default_rng(2).standard_normal((4_000_000, 256), dtype=np.float32).astype(np.float16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = fit(x, KMeansConfig(k=256, niter=2, nredo=1, max_points_per_centroid=20_000, backend="torch"), "cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert r.backend == "torch-cuda" and r.sizes.sum() == len(x)
    assert peak < 1.5 * x.nbytes, f"peak {peak / 2**20:.0f} MiB for {x.nbytes / 2**20:.0f} MiB of float16"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("objective", ["mapet", "beit"])
def test_compiled_training_is_one_graph_and_follows_eager_training(store_cuda, tmp_path, objective, mode):
    """--compile MODE on CUDA: the objective compiles once, as one graph, with no break and no graph left out
    of CUDA graphs, over every step (BEiT's masks differ in size from step to step), and trains as eager does:
    the same loss and gradient norm at every step, bf16 rounding apart (no drop path, so no random draw
    differs). Eager MaPeT runs FlexAttention, compiled MaPeT SDPA with the boolean masks. Under torch 2.11
    compiled training once ran on zero gradients (token_loss's saved gradients), and with FlexAttention traced
    into the graph MaPeT's gradient norm left eager's after six steps (1000x at step 10); CUDA graphs
    overwriting gradients would show here too."""
    from torch._dynamo.utils import counters

    eager = training_log(store_cuda, tmp_path / "eager", objective=objective)
    torch._dynamo.reset()
    counters.clear()
    compiled = training_log(store_cuda, tmp_path / "compiled", objective=objective, compile=mode)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["inductor"]["cudagraph_skips"] == 0
    np.testing.assert_allclose(compiled, eager, rtol=5e-2)


def test_flex_attention_training_follows_sdpa_training(store_cuda, tmp_path):
    """Eager MaPeT training on CUDA, FlexAttention (the default there) against SDPA with the boolean masks, an
    independent kernel: the same loss and gradient norm at every step, bf16 rounding apart. Compiled
    FlexAttention inside a traced step matched eager at the first steps and left it after six, so a
    one-step gradient check at initialisation is not enough; this follows the weights as they train."""
    flex = training_log(store_cuda, tmp_path / "flex", objective="mapet", attn_backend="flex")
    sdpa = training_log(store_cuda, tmp_path / "sdpa", objective="mapet", attn_backend="sdpa")
    np.testing.assert_allclose(flex, sdpa, rtol=5e-2)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_finetune_on_cuda_follows_eager(tmp_path, mode):
    """mapet finetune --compile MODE on CUDA: the per-epoch losses and top-1 of the eager run, bf16 rounding
    apart (no drop path)."""
    from cli.mapet import main
    from tests.runs import ft_args, separable_folder

    data = separable_folder(tmp_path / "data", n_per_class=16)
    flat = ("--epochs", "3", "--drop-path", "0", "--device", "cuda")
    hist = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile", mode))):
        torch._dynamo.reset()
        assert main(ft_args(data, tmp_path / name, *flat, *extra)) == 0
        hist[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["history"]
    losses = {k: [r["loss"] for r in h] for k, h in hist.items()}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=5e-2)
    assert losses["eager"][-1] < losses["eager"][0]
    assert abs(hist["compiled"][-1]["val_top1"] - hist["eager"][-1]["val_top1"]) <= 0.1


def test_cuda_features_match_cpu_features(photos, vit_spec, tmp_path):
    """`tokenkit features` on the GPU (uint8 batches normalised there) stores the CPU's features, up to
    float16 storage and fp32 rounding."""
    from tokenkit.features import FeaturesConfig, FeatureStore, extract_features

    got = {}
    for dev in ("cpu", "cuda"):
        cfg = FeaturesConfig(max_patches=10_000, shard_size=4, workers=0, device=dev, precision="fp32")
        extract_features(photos, tmp_path / dev, vit_spec, cfg, progress=False)
        got[dev] = FeatureStore.open(tmp_path / dev).group["features"][:].astype(np.float32)
    assert got["cuda"].shape == got["cpu"].shape
    np.testing.assert_allclose(got["cuda"], got["cpu"], rtol=1e-2, atol=1e-2)


def test_token_loss_on_cuda_matches_the_plain_head_in_bf16_and_keeps_no_logits():
    """The blocked head + cross-entropy under CUDA bf16 autocast: the plain head's loss and gradients, and a
    lower peak than the plain head at MaPeT-B's batch-128 size (147 · 128 rows, K 8192)."""
    import torch.nn.functional as F

    from pretrain.token_loss import token_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(768, 8192).to(CUDA)
    x = torch.randn(128 * 147, 768, device=CUDA, requires_grad=True)
    y = torch.randint(0, 8192, (128 * 147,), device=CUDA)

    def plain():
        logits = head(x)
        return F.cross_entropy(logits.float(), y)

    def fused():
        return token_loss(x, head, y)[0]

    results = []
    for f in (plain, fused):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = f()
        grads = torch.autograd.grad(loss, [x, head.weight, head.bias])
        torch.cuda.synchronize()
        results.append((loss, grads, torch.cuda.max_memory_allocated() - base))
    (want, gw, peak_plain), (got, gg, peak_fused) = results
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(gg, gw, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 2e-2 * b.norm()
    print(
        f"peak above inputs: plain head {peak_plain / 2**20:.0f} MiB, token_loss {peak_fused / 2**20:.0f} MiB"
    )
    assert peak_fused < 0.5 * peak_plain


def test_knn_and_linear_probe_on_cuda_agree_with_cpu():
    """k-NN and the full-batch L-BFGS probe run on the GPU (ImageNet-sized evaluations) with the CPU's answers."""
    from pretrain.evaluate import ProbeConfig, knn_classify, linear_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g) * 0.3  # overlapping classes: k-NN ~0.67, probe ~0.76 here
    y = torch.arange(3000) % 10
    x = centers[y] + torch.randn(3000, 64, generator=g)
    cpu, gpu = (knn_classify(x[:2500], y[:2500], x[2500:], block=256, device=d) for d in ("cpu", CUDA))
    assert gpu.device.type == "cpu" and (cpu != gpu).sum() <= 2  # float ties may fall either way
    cfg = ProbeConfig(l2=1e-4)  # one fixed penalty: the fit itself is compared, not the sweep's tie-breaks
    a, b = (linear_probe(x[:2500], y[:2500], x[2500:], y[2500:], cfg, d) for d in ("cpu", CUDA))
    assert abs(a["top1"] - b["top1"]) <= 0.01 and abs(a["train_top1"] - b["train_top1"]) <= 0.004
    assert 0.5 < b["top1"] < 1.0


def test_colour_jitter_on_cuda_matches_the_cpu():
    """The trainer's input on the GPU (uint8 batch -> jittered, normalised floats) equals the CPU's."""
    from pretrain.data import jitter_draws, to_input
    from tokenkit.views import keyed_rng

    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8))
    draws = torch.stack([jitter_draws(keyed_rng("j", i), 0.4) for i in range(32)])
    got = to_input(pixels.pin_memory(), CUDA, draws).cpu()
    torch.testing.assert_close(got, to_input(pixels, "cpu", draws), rtol=0, atol=1e-5)
