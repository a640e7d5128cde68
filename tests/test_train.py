"""The trainer (pretrain/train.py): learns on a fixed batch, its schedule and settings, the objectives compiled as eager, gradient checkpointing; the store checks before step 0."""

import math
import zlib
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_checkpoint
from pretrain.data import StoreDataset, random_orders
from pretrain.mapet import MaPeT
from pretrain.optim import lr_at, param_groups
from pretrain.train import Objective, pretrain
from pretrain.vit import VisionTransformer, ViTConfig
from tests.runs import DRAWS, metrics, tiny, training_store
from tokenkit.errors import ConfigError, DivergedError, StoreError
from tokenkit.store import TokenStore
from tokenkit.tokenize_job import TokenizeConfig, tokenize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos, codebook_path):
    return training_store(tmp_path_factory.mktemp("train") / "tokens", photos, codebook_path)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    vit = ViTConfig(image_size=64, patch_size=16, dim=64, depth=2, heads=4, drop_path=0.0)
    model = MaPeT(vit, vocab_size=16)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    images, targets = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 16, (8, 16), generator=g)
    orders = random_orders(8, 16, g)
    losses = []
    for _ in range(30):
        loss, _ = model.loss(images, targets, orders)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_schedule_and_no_decay_groups():
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0 and lr_at(10, 100, 10, 1.0, 0.0) == 1.0
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1) and lr_at(
        55, 100, 10, 1.0, 0.0
    ) == pytest.approx(0.5)
    model = MaPeT(ViTConfig(image_size=32, patch_size=16, dim=32, depth=1, heads=2), 8)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "encoder.pos_embed", "encoder.cls_token", "encoder.blocks.0.ls1.gamma"} <= skipped
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])


@pytest.mark.parametrize("objective", ["mapet", "beit"])
def test_pretrain_runs_and_checkpoints(store, tmp_path, objective):
    cfg = tiny(store, tmp_path / "run", objective=objective, epochs=2)
    last = pretrain(cfg, progress=False)
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]  # 12 images / batch 4 = 3 steps per epoch
    assert all(0 <= r["token_acc"] <= 1 and r["loss"] > 0 for r in m)
    ckpt = load_checkpoint(last)
    assert ckpt["step"] == 6 and ckpt["objective"] == objective and ckpt["store"]["k"] == 16
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.pt")) == [
        "ckpt-00000003.pt",
        "ckpt-00000006.pt",
    ]
    with pytest.raises(ConfigError, match="--resume auto"):
        pretrain(cfg, progress=False)


def test_fp16_on_cpu_scales_the_loss(store, tmp_path):
    """--precision fp16 trains with a live GradScaler on the run's own device (torch's default device for
    one is CUDA: on a CPU it would warn, disable itself and train fp16 unscaled)."""
    cfg = tiny(store, tmp_path / "run", precision="fp16", max_steps=2)
    ckpt = load_checkpoint(pretrain(cfg, progress=False))
    assert ckpt["scaler"]["scale"] == 2.0**16 and ckpt["scaler"]["_growth_tracker"] == 2
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


def test_logged_data_wait_shows_a_slow_loader(store, tmp_path, monkeypatch):
    """metrics.jsonl's data_wait is the share of wall time spent waiting for batches: a loader slowed by
    0.5 s per batch shows up as most of the time, and as more than a normal loader's share."""
    import time

    cfg = tiny(store, tmp_path / "fast", max_steps=4)
    pretrain(cfg, progress=False)
    fast = [r["data_wait"] for r in metrics(tmp_path / "fast")][1:]  # the first line includes the start
    real = StoreDataset.__getitems__

    def slow(self, positions):
        time.sleep(0.5)
        return real(self, positions)

    monkeypatch.setattr(StoreDataset, "__getitems__", slow)
    pretrain(tiny(store, tmp_path / "slow", max_steps=4), progress=False)
    slowed = [r["data_wait"] for r in metrics(tmp_path / "slow")][1:]
    assert all(0 <= w <= 1 for w in fast + slowed)
    assert min(slowed) > 0.5 and min(slowed) > max(fast)


def test_a_non_finite_loss_stops_training_before_a_checkpoint_keeps_it(store, tmp_path, monkeypatch):
    """The loss is read back only at logged steps and before checkpoints (no sync on other steps), and a
    NaN from step 5 on stops the run there, with the step in a one-line error, before step 6's checkpoint."""
    import pretrain.train as t

    real = t.Objective.forward
    calls = [0]

    def nan_from_step_5(self, *batch):
        calls[0] += 1
        loss, acc = real(self, *batch)
        return (loss * float("nan") if calls[0] >= 5 else loss), acc

    monkeypatch.setattr(t.Objective, "forward", nan_from_step_5)
    run = tmp_path / "run"
    cfg = tiny(store, run, epochs=4, log_every=4)  # 3 steps per epoch: checkpoints at 3, 6, 9, 12
    with pytest.raises(
        DivergedError, match=r"^step 6: loss is nan; .*last.pt, the last checkpoint.*lower --lr"
    ):
        pretrain(cfg, progress=False)
    assert [r["step"] for r in metrics(run)] == [1, 4]  # logged steps only; step 3 checked, not logged
    assert load_checkpoint(run / "last.pt")["step"] == 3


def test_pretrain_says_what_it_will_run(store, tmp_path, capsys):
    """One line before step 0 (with progress on): model, size, data, batch split, schedule; and where a
    resumed run goes on."""
    run, n = tmp_path / "run", len(TokenStore.open(store))
    pretrain(tiny(store, run, epochs=2, max_steps=2), progress=True)
    params = sum(p.numel() for p in load_checkpoint(run / "last.pt")["model"].values()) / 1e6
    line = (
        f"mapet mapet_micro: {params:.1f}M parameters, K 16, {n} images x 2 views (zarr); global batch 4 "
        f"(4 x 1 x 1 ranks), {n // 4} steps per epoch, {2 * (n // 4)} steps, warmup {n // 4}, lr 0.001, fp32 on cpu"
    )
    assert line + "\n" in capsys.readouterr().out
    pretrain(tiny(store, run, epochs=2), resume=True, progress=True)
    assert line + "; resuming at step 2\n" in capsys.readouterr().out


def test_bad_settings_are_refused_before_the_run_folder_is_made(tmp_path, photos, codebook_path):
    wds = tokenize(
        photos, codebook_path, tmp_path / "wds", TokenizeConfig(format="wds", workers=0), progress=False
    )
    with pytest.raises(ConfigError, match="holds only webdataset shards; pass --data wds"):
        pretrain(tiny(wds, tmp_path / "run", data="zarr"), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(
        ConfigError,
        match="images cannot fill one step of 60000 \\(--batch-size 60000 x --accum-steps 1 x 1 ranks\\)",
    ):
        pretrain(tiny(wds, tmp_path / "run", batch_size=60000), progress=False)
    assert not (tmp_path / "run").exists()
    for bad, message in (
        (dict(num_context=60), r"--num-context 60: must be in \[1, 49\] for 50 tokens"),
        (dict(num_context=0), r"--num-context 0: must be in \[1, 49\]"),
        (dict(lr=-1.0), r"--lr -1.0: must be in \[1e-12, 10\]"),
        (dict(clip_grad=0.0), r"--clip-grad 0.0: must be in \[1e-6, 1e6\]"),
        (dict(drop_path=1.0), r"--drop-path 1.0: must be in \[0, 1\)"),
        (dict(objective="beit", num_context=20), "--num-context 20: a MaPeT setting"),
        (dict(compile="reduce-overhead", accum_steps=2), "reduce-overhead with --accum-steps 2: CUDA graphs"),
        (dict(compile="fast"), "--compile fast: choose one of default, reduce-overhead, max-autotune"),
        (dict(compile="default", attn_backend="flex"), "--attn-backend flex with --compile default: FlexAtt"),
        (dict(attn_backend="fast"), "--attn-backend fast: choose auto, sdpa or flex"),
        (dict(max_steps=0), "--max-steps 0: must be >= 1"),
        (dict(patch_size=0), r"--patch-size 0: must be in \[1, 8192\]"),  # 0 is not "the preset's"
        (dict(image_size=0), r"--image-size 0: must be in \[1, 8192\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            pretrain(tiny(wds, tmp_path / "run", **{"image_size": 112, **bad}), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="reduce-overhead under torchrun"):
        pretrain(tiny(wds, tmp_path / "run", compile="reduce-overhead"), rank=0, world=2, progress=False)
    assert not (tmp_path / "run").exists()


def test_compile_mode_reaches_torch_compile_and_cuda_graph_steps_are_marked(store, tmp_path, monkeypatch):
    """--compile reduce-overhead: the objective is compiled in that mode and every step starts with
    cudagraph_mark_step_begin (the graphs' outputs of the step before die there, so CUDA graphs may reuse
    their memory); --compile alone compiles in torch's default mode and marks nothing."""
    from pretrain.train import Objective

    real, modes, marks = torch.compile, [], []

    def record(m, *a, mode=None, **kw):  # compiles with the eager backend: only the plumbing is under test
        if isinstance(m, Objective):
            modes.append(mode)
            return real(m, backend="eager")
        return real(m, *a, mode=mode, **kw)

    monkeypatch.setattr(torch, "compile", record)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, steps in (("reduce-overhead", 3), ("default", 2)):
        torch._dynamo.reset()
        pretrain(tiny(store, tmp_path / mode, compile=mode, max_steps=steps), progress=False)
        assert [m["step"] for m in metrics(tmp_path / mode)][-1] == steps
    assert modes == ["reduce-overhead", "default"] and len(marks) == 3


def test_moved_source_images_are_named_before_the_run_starts(tmp_path, photos, codebook_path):
    import shutil

    src = shutil.copytree(photos, tmp_path / "photos")
    tokens = tokenize(src, codebook_path, tmp_path / "tokens", TokenizeConfig(workers=0), progress=False)
    moved = src.rename(tmp_path / "moved")
    with pytest.raises(StoreError, match="if the images moved, pass their folder as --source-root"):
        pretrain(tiny(tokens, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    pretrain(tiny(tokens, tmp_path / "run", source_root=str(moved), max_steps=1), progress=False)
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1]


def test_source_images_changed_since_tokenize_are_refused(tmp_path, photos, codebook_path):
    """The store keeps each image's crc32: an image re-encoded after tokenizing (same name, other pixels, so
    the stored tokens no longer describe it) stops training with its name, before step 0 when it is the
    first image and when met in the epoch otherwise; the untouched store trains."""
    import shutil

    from PIL import Image

    from cli.tokenkit import main as tokenkit_main
    from tokenkit.store import TokenStore, verify_sources

    src = shutil.copytree(photos, tmp_path / "photos")
    tokens = tokenize(src, codebook_path, tmp_path / "tokens", TokenizeConfig(workers=0), progress=False)
    store = TokenStore.open(tokens)
    assert verify_sources(store, progress=False) == []
    block = store.read(range(len(store)))
    assert all(
        zlib.crc32((src / loc).read_bytes()) == c
        for loc, c in zip(block["locators"], block["crc32"], strict=True)
    )
    pretrain(tiny(tokens, tmp_path / "ok", max_steps=1), progress=False)

    def reencode(locator):
        Image.open(src / locator).save(src / locator, "JPEG", quality=50)

    last = block["locators"][-1]
    reencode(last)
    with pytest.raises(StoreError, match=f"'{last}' changed since it was tokenized"):
        pretrain(tiny(tokens, tmp_path / "late", epochs=1), progress=False)
    reencode(block["locators"][0])
    with pytest.raises(StoreError, match=f"'{block['locators'][0]}' changed since it was tokenized"):
        pretrain(tiny(tokens, tmp_path / "early"), progress=False)
    assert not (tmp_path / "early").exists()
    with pytest.raises(StoreError, match="changed since it was tokenized"):
        store.image(0)  # what 'tokenkit show' draws on
    # 'tokenkit verify --sources' lists both, and only them, without training
    problems = verify_sources(store, progress=False)
    assert len(problems) == 2 and all("changed since it was tokenized" in p for p in problems)
    assert {block["locators"][0], last} == {p.split("'")[1] for p in problems}
    assert tokenkit_main(["verify", str(tokens), "--sources", "--quiet"]) == 1
    assert tokenkit_main(["verify", str(tokens)]) == 0  # the store's own files are intact


def test_trainer_refuses_a_damaged_store_before_step_0(store, tmp_path):
    import shutil

    bad = tmp_path / "tokens"
    shutil.copytree(store, bad)
    p = bad / "tokens/c/0/0/0/0"
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(StoreError, match="shard 0 sha256 mismatch.*refusing to train"):
        pretrain(tiny(bad, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_store_checks_cover_what_the_run_reads_and_a_resume_rehashes_only_rewritten_files(
    store, tmp_path, monkeypatch
):
    """A zarr run hashes the zarr arrays (a damaged tar does not stop it, a wds run refuses it); a resume
    hashes nothing when the files are unchanged since the checkpoint, and everything they cover when one was
    rewritten (size or mtime)."""
    import shutil

    import pretrain.train as train_mod

    copy = tmp_path / "tokens"
    shutil.copytree(store, copy)
    tar = copy / "wds/shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-512])  # a truncated tar
    with pytest.raises(StoreError, match="shard-000000.tar: shard 0 sha256 mismatch"):
        pretrain(tiny(copy, tmp_path / "wds-run", data="wds"), progress=False)
    calls = []
    real = train_mod.verify
    monkeypatch.setattr(
        train_mod, "verify", lambda path, part, *ranks: calls.append(part) or real(path, part, *ranks)
    )
    run = tmp_path / "run"
    pretrain(tiny(copy, run, data="zarr", max_steps=1), progress=False)
    assert calls == ["zarr"]
    pretrain(tiny(copy, run, data="zarr", max_steps=2), resume=True, progress=False)
    assert calls == ["zarr"]  # unchanged since the checkpoint: not hashed again
    chunk = copy / "tokens/c/0/0/0/0"
    b = bytearray(chunk.read_bytes())
    b[-1] ^= 0xFF
    chunk.write_bytes(bytes(b))  # rewritten: a new mtime
    with pytest.raises(StoreError, match="shard 0 sha256 mismatch"):
        pretrain(tiny(copy, run, data="zarr", max_steps=3), resume=True, progress=False)
    assert calls == ["zarr", "zarr"]


def test_streamed_webdataset_training_is_deterministic_and_resumable(store, tmp_path):
    from pretrain.data import StreamDataset

    # the same batch sequence for any number of DataLoader workers, and from a mid-epoch start
    def batches(workers, start=0):
        ds = StreamDataset(
            store, 64, batch_size=2, batches_per_epoch=5, draws=DRAWS, seed=1, jitter=0.4, buffer=4
        )
        ds.set_epoch(0, start)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return [(x.sum().item(), y.tolist(), j.tolist()) for x, y, j, _, _ in loader]

    ref = batches(0)
    assert len(ref) == 5 and batches(2) == ref and batches(2, start=3) == ref[3:]
    # ranks stream equal numbers of batches from their own resampled shards
    a = StreamDataset(store, 64, 2, 5, DRAWS, rank=0, world=2, seed=1)
    b = StreamDataset(store, 64, 2, 5, DRAWS, rank=1, world=2, seed=1)
    assert len(list(a)) == len(list(b)) == 5
    # and the trainer runs on it
    cfg = tiny(store, tmp_path / "run", data="wds", epochs=1)
    pretrain(cfg, progress=False)
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["mapet", "beit"])
def test_compiled_objective_equals_eager_on_cpu(kind):
    """--compile (torch.compile of the objective, custom autograd functions included) gives the eager loss
    and gradients, with --grad-checkpointing too. MaPeT takes the trainer's per-sample drop-path draws; BEiT
    draws on the device (as fine-tuning does), and the compiled recomputation must replay those draws (drop
    path 0.5 in the second block, so a fresh draw would show)."""
    from pretrain.beit import BEiT
    from pretrain.train import compiled

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, drop_path=0.5)
    net = MaPeT(cfg, 64) if kind == "mapet" else BEiT(cfg, 64)
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 64, (4, 16))
    # MaPeT: factorisation orders; BEiT: masks of 6, 6, 4 and 2 patches (padded to 6 rows each)
    aux = (
        random_orders(4, 16, g) if kind == "mapet" else torch.arange(16) < torch.tensor([[6], [6], [4], [2]])
    )
    drop = torch.rand(4, 2, 2, generator=g) if kind == "mapet" else None  # (B, depth, 2)
    results = []
    for ckpt, compile in ((False, False), (False, True), (True, True)):  # eager, compiled, + checkpointing
        net.encoder.grad_checkpointing = ckpt
        torch._dynamo.reset()
        objective = compiled(Objective(net), images.device) if compile else Objective(net)
        torch.manual_seed(1)  # the same drop-path draws (BEiT)
        loss, acc = objective(images, targets, aux, drop)
        results.append((loss, acc, torch.autograd.grad(loss, list(net.parameters()))))
    (l1, a1, g1) = results[0]
    for l2, a2, g2 in results[1:]:
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        assert a1 == a2
        for x, y in zip(g2, g1, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_compiled_objectives_are_captured_once_in_one_graph(monkeypatch):
    """--compile: MaPeT with explicit FlexAttention (its BlockMasks built before compiling), MaPeT with "auto"
    (SDPA inside the graph, as on CUDA) and BEiT (masks of different sizes from step to step) are each one
    graph, compiled once: no recompiles, no graph breaks (torch 2.11 split MaPeT at every call of the
    compiled FlexAttention wrapper). Compiled losses equal eager's, and the gradients too where the CPU has a
    backward (all but FlexAttention)."""
    from torch._dynamo.testing import CompileCounter

    from pretrain.beit import BEiT
    from pretrain.train import compiled

    cfg = ViTConfig(image_size=64, patch_size=16, dim=32, depth=2, heads=2)
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 40, (2, 16), generator=g)
    real = torch.compile
    counts = torch.tensor([[6, 3], [5, 4], [4, 5], [3, 3]])  # masked patches per sample at each step
    drops = torch.rand(4, 2, 2, 2, generator=g)  # (steps, B, depth, 2): the trainer's per-sample draws
    for net, aux in [
        (MaPeT(cfg, 40, attn_backend="flex"), lambda i: random_orders(2, 16, g)),
        (MaPeT(cfg, 40), lambda i: random_orders(2, 16, g)),  # auto: SDPA inside the graph, as on CUDA
        (BEiT(cfg, 40), lambda i: torch.arange(16).expand(2, 16) < counts[i][:, None]),
    ]:
        torch._dynamo.reset()
        counter = CompileCounter()
        step_of = Objective(net)

        def count(m, *a, c=counter, s=step_of, **kw):  # counts the objective's graphs, not FlexAttention's
            return real(m, backend=c) if m is s else real(m, *a, **kw)

        monkeypatch.setattr(torch, "compile", count)
        step = compiled(step_of, images.device)
        for i in range(4):
            a = aux(i)
            if (
                isinstance(net, MaPeT) and net.attention.backend == "flex"
            ):  # FlexAttention: no backward on the CPU
                with torch.no_grad():
                    got = step(images, targets, a, drops[i])
                    want = Objective(net)(images, targets, a, drops[i])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                continue
            loss, acc = step(images, targets, a, drops[i])
            got = torch.autograd.grad(loss, list(net.parameters()))
            want_loss, want_acc = Objective(net)(images, targets, a, drops[i])
            want = torch.autograd.grad(want_loss, list(net.parameters()))
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
            assert acc == want_acc
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert counter.frame_count == 1, type(net).__name__


class _Features(torch.nn.Module):  # the encoder as fine-tuning and evaluation run it: forward_features
    def __init__(self, cfg):
        super().__init__()
        self.encoder = VisionTransformer(cfg)

    def loss(self, images, targets, aux, drop=None):
        return self.encoder.forward_features(images, drop).square().mean(), None


@pytest.mark.parametrize("kind", ["mapet", "beit", "encoder"])
def test_grad_checkpointing_keeps_loss_and_gradients_and_keeps_far_less(kind):
    """--grad-checkpointing: each block keeps only its input for backward and is recomputed there, drop-path
    draws replayed: the same loss and gradients (fp64) from about a fifth of the saved elements."""
    from pretrain.beit import BEiT

    cfg = ViTConfig(image_size=32, patch_size=8, dim=32, depth=3, heads=2, drop_path=0.3)
    torch.manual_seed(0)
    net = {"mapet": lambda: MaPeT(cfg, 40), "beit": lambda: BEiT(cfg, 40), "encoder": lambda: _Features(cfg)}
    net = net[kind]().double()
    g = torch.Generator().manual_seed(0)
    images, targets = (
        torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64),
        torch.randint(0, 40, (3, 16)),
    )
    aux = random_orders(3, 16, g) if kind == "mapet" else torch.arange(16) < torch.tensor([[6], [5], [3]])
    runs = []
    for on in (False, True):
        net.encoder.grad_checkpointing = on
        saved = []
        torch.manual_seed(5)  # the same drop-path draws
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, s=saved: s.append(t.numel()) or t, lambda t: t
        ):
            loss, _ = net.loss(images, targets, aux)
        runs.append((loss, torch.autograd.grad(loss, list(net.parameters())), sum(saved)))
    (l0, g0, s0), (l1, g1, s1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-14, atol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert s1 < s0 / 4, (s1, s0)


def test_grad_checkpointing_trains_the_same_run_and_may_change_on_resume(store, tmp_path):
    """A run with --grad-checkpointing logs the losses of the run without it, and a run may resume with the
    flag switched (it changes memory, not the computation); so may --attn-backend (another kernel)."""
    ref = tmp_path / "ref"
    pretrain(tiny(store, ref, epochs=2, ckpt_every=2), progress=False)
    run = tmp_path / "run"
    first = dict(grad_checkpointing=True, attn_backend="sdpa", max_steps=4)
    pretrain(tiny(store, run, epochs=2, ckpt_every=2, **first), progress=False)
    pretrain(tiny(store, run, epochs=2, ckpt_every=2), resume=True, progress=False)
    got, want = metrics(run), metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want] and len(got) > 4
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["token_acc"] == b["token_acc"]
