"""tokenize: tokens are the nearest centroids of the stored views' features; zarr == wds; resumable; ranks.
(Every tokenizer family's own tokens: tests/test_families.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli.tokenkit import main
from tests.preempt import run_preempted
from tests.tars import make_tar
from tokenkit.codebook import Codebook
from tokenkit.encoders import load_encoder
from tokenkit.errors import CodebookError, StoreError
from tokenkit.images import decode_image
from tokenkit.store import TokenStore, verify
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig, center_box, render_view, to_tensor
from tokenkit.wds import iter_tar

ROOT = Path(__file__).resolve().parents[1]
CFG = TokenizeConfig(
    views=ViewConfig(views=3, mode="random", seed=1), format="both", shard_size=4, workers=0, batch_size=3
)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, photos, codebook_path):
    out = tmp_path_factory.mktemp("tok") / "store"
    tokenize(photos, codebook_path, out, CFG, progress=False)
    return out


def brute_tokens(img, views, cb: Codebook | Path) -> np.ndarray:
    """Render each view alone, encode it alone, nearest centroid by float64 brute force: (V, G, G)."""
    cb = cb if isinstance(cb, Codebook) else Codebook.load(cb)
    enc = load_encoder(cb.encoder)
    spec = cb.encoder
    out = []
    for v in views:
        x = to_tensor(render_view(img, v, spec.image_size), spec.mean, spec.std)[None]  # (1, 3, S, S)
        f = enc(x)[0].double().numpy()  # (G*G, C)
        d2 = ((f[:, None, :] - cb.centroids[None].astype(np.float64)) ** 2).sum(-1)  # (G*G, K)
        out.append(d2.argmin(1).reshape(spec.grid, spec.grid))
    return np.stack(out)


def test_stored_views_retokenize_to_stored_tokens(store_path):
    store = TokenStore.open(store_path)
    assert len(store) == 12 and store.num_views == 3 and store.grid == 4
    for pos in (0, 5, 11):
        s = store.read([pos])
        img = store.image(pos)
        views = s["views"][0]
        assert (views[:, 2] > 0).all() and (views[:, 0] + views[:, 2] <= img.width).all()
        assert np.array_equal(s["tokens"][0], brute_tokens(img, views, store.tokenizer_path))


def test_tokenizer_api_gives_the_stored_tokens(store_path, codebook_path, tmp_path):
    """tokenkit.tokenizer.Tokenizer (the Python API, which `tokenize` runs) on an image and a stored view row
    gives that view's stored tokens; with no view, the central square's tokens (brute force)."""
    import torch

    from tokenkit.tokenizer import load_tokenizer
    from tokenkit.views import center_box

    tok = load_tokenizer(codebook_path, device="cpu")
    store = TokenStore.open(store_path)
    assert (tok.grid, tok.id, tok.k) == (store.grid, store.tokenizer_id, store.k)
    for pos in (0, 7):
        s, img = store.read([pos]), store.image(pos)
        for v, view in enumerate(s["views"][0]):
            ids = tok.encode_image(img, view)
            assert ids.dtype == torch.int64 and np.array_equal(ids.numpy(), s["tokens"][0, v])
        center = np.array([[*center_box(*img.size), 0]])
        assert np.array_equal(
            tok.encode_image(img).numpy(), brute_tokens(img, center, store.tokenizer_path)[0]
        )
    with pytest.raises(ValueError, match=r"expected \(B, 64, 64, 3\) uint8 views"):
        tok(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    # an image as Image.open gives it (EXIF-rotated JPEG, RGBA PNG) is read as the tokenize job decodes it
    from PIL import Image

    img = store.image(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    for name in ("rot.jpg", "alpha.png"):
        want = tok.encode_image(decode_image((tmp_path / name).read_bytes()))
        assert torch.equal(tok.encode_image(Image.open(tmp_path / name)), want)


def test_codebook_of_another_encoder_width_is_refused(tmp_path, codebook_path, photos):
    """A codebook whose centroids do not have its encoder's feature width: one line naming the file."""
    cb = Codebook.load(codebook_path)
    bad = tmp_path / "bad.safetensors"
    Codebook(np.zeros((cb.k, cb.dim + 1), np.float32), cb.encoder, cb.meta).save(bad)
    with pytest.raises(CodebookError, match=f"{bad}: centroids have dim {cb.dim + 1} but"):
        tokenize(photos, bad, tmp_path / "t", TokenizeConfig(workers=0), progress=False)
    assert not (tmp_path / "t").exists()


def test_views_are_keyed_by_seed_and_key_and_center_view_is_the_central_square(
    tmp_path, photos, codebook_path
):
    a = TokenStore.open(
        tokenize(
            photos,
            codebook_path,
            tmp_path / "a",
            TokenizeConfig(views=ViewConfig(views=1, mode="center"), shard_size=5, workers=0),
            progress=False,
        )
    )
    r = a.read(np.arange(len(a)))
    for i in range(len(a)):
        img = a.image(i)
        side = min(img.size)
        assert tuple(r["views"][i, 0]) == ((img.width - side) // 2, (img.height - side) // 2, side, side, 0)


def test_zarr_and_wds_hold_identical_tokens(store_path):
    store = TokenStore.open(store_path)
    z = store.read(np.arange(len(store)))
    from_wds = [s for p in store.tar_paths() for s in iter_tar(p)]
    assert [s["key"] for s in from_wds] == z["keys"]
    for i, s in enumerate(from_wds):
        assert np.array_equal(s["tokens"], z["tokens"][i]) and s["tokens"].dtype == np.uint16
        assert np.array_equal(s["views"], z["views"][i]) and s["label"] == z["labels"][i]
        assert s["data"] == store.image_bytes(i)  # the original bytes travel with the tokens
        assert decode_image(s["data"]).size == store.image(i).size


def test_read_by_key_blocks_and_labels(store_path):
    store = TokenStore.open(store_path)
    keys = store.read(np.arange(len(store)))["keys"]
    assert store.index_of("odd/chelsea") == keys.index("odd/chelsea")
    block = store.read([7, 2, 7])
    assert block["keys"] == [keys[7], keys[2], keys[7]] and block["tokens"].dtype == np.int64
    assert set(block["labels"].tolist()) <= {0, 1}
    assert store.stats()["labels"] == {"even": 6, "odd": 6}
    with pytest.raises(StoreError, match="no stored sample with key 'missing'$"):
        store.index_of("missing")
    # the source path finds its sample too; a near miss names the closest key
    assert store.index_of("odd/chelsea.jpg") == store.index_of("odd/chelsea")
    with pytest.raises(StoreError, match="key 'odd/chelsee' \\(closest: 'odd/chelsea'\\)"):
        store.index_of("odd/chelsee")
    store._key_index = {"a/x": 0, "a/x_jpg": 1, "a/y_z": 2}  # keys of a/x.jpg, a/x.jpg.png and a/y.z.png
    assert store.index_of("a/y.z") == store.index_of("a/y.z.png") == 2 and store.index_of("a/x") == 0
    with pytest.raises(StoreError, match="'a/x.jpg' may be key 'a/x' or 'a/x_jpg'; pass one"):
        store.index_of("a/x.jpg")


def test_read_serves_the_zarr_rows_with_metadata_held_in_memory(store_path):
    """read() equals the stored rows array by array, before and after `meta` (what the trainer calls once);
    with it held, a batch reads only the tokens from zarr; a pickled store (a DataLoader worker's copy) reads
    the same."""
    import pickle

    import zarr

    store = TokenStore.open(store_path)
    g, rows = zarr.open_group(str(store_path), mode="r"), store.rows
    pos = [9, 0, 4, 4, 11]
    one_off = store.read(pos)  # nothing held: these rows are read from every array
    store.meta()
    block = store.read(pos)
    for name in ("tokens", "views", "labels", "crc32"):
        want = g[name][:][rows[pos]]
        assert np.array_equal(block[name], want) and np.array_equal(one_off[name], want), name
    for name in ("keys", "locators"):
        assert block[name] == one_off[name] == [str(k) for k in g[name][:][rows[pos]]]
    opened = []
    real = type(store.group).__getitem__
    type(store.group).__getitem__ = lambda self, name: opened.append(name) or real(self, name)
    try:
        store.read([1, 2])
    finally:
        type(store.group).__getitem__ = real
    assert opened == ["tokens"]
    copy = pickle.loads(pickle.dumps(store))
    assert copy._meta is not None
    assert {k: str(v) for k, v in copy.read(pos).items()} == {k: str(v) for k, v in block.items()}


def test_codebook_of_another_model_is_refused(tmp_path, photos, codebook_path):
    cb = Codebook.load(codebook_path)
    bad = Codebook(np.zeros((16, 10), np.float32), cb.encoder, cb.meta)
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(CodebookError, match="dim 10 but tokenkit-tiny-vit gives 96-d"):
        tokenize(photos, tmp_path / "bad.safetensors", tmp_path / "out", CFG, progress=False)


def test_output_folder_holding_another_store_is_refused(tmp_path, photos, codebook_path, store_path):
    with pytest.raises(StoreError, match="made by another job"):
        tokenize(photos, codebook_path, store_path, TokenizeConfig(shard_size=4, workers=0), progress=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        tokenize(photos, codebook_path, tmp_path / "x", CFG, progress=False)
    # the same job again is a no-op on a complete store
    assert tokenize(photos, codebook_path, store_path, CFG, progress=False) == store_path


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


KILLER = """
import os, signal, sys
import tokenkit.journal as j
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig
n = int(sys.argv[4]); calls = [0]
real = j.atomic_write_bytes
def dying(path, data):
    calls[0] += 1
    if calls[0] == n:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f: f.write(data[: len(data) // 2])  # a torn write, then death
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
for mod in ("tokenkit.journal", "tokenkit.wds", "tokenkit.codebook"):
    m = sys.modules.get(mod)
    if m is not None and hasattr(m, "atomic_write_bytes"): m.atomic_write_bytes = dying
cfg = TokenizeConfig(views=ViewConfig(views=3, mode="random", seed=1), format="both", shard_size=4, workers=0, batch_size=3)
tokenize(sys.argv[1], sys.argv[2], sys.argv[3], cfg, resume=True, progress=False)
"""


@pytest.mark.parametrize("kill_at", [2, 4, 7])
def test_killed_job_resumes_to_a_byte_identical_store(tmp_path, photos, codebook_path, store_path, kill_at):
    out = tmp_path / "store"
    r = subprocess.run(
        [sys.executable, "-c", KILLER, str(photos), str(codebook_path), str(out), str(kill_at)],
        cwd=ROOT,
        capture_output=True,
    )
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="--resume"):
        tokenize(photos, codebook_path, out, CFG, progress=False)
    tokenize(photos, codebook_path, out, CFG, resume=True, progress=False)
    assert tree_bytes(out) == tree_bytes(store_path)
    assert verify(out) == []


def test_sigterm_stops_after_the_shard_in_flight_and_resumes_byte_identical(
    tmp_path, photos, codebook_path, capsys
):
    """A preempted tokenize job (SIGTERM to every process, as SLURM sends it) finishes and commits the shard in
    flight (6 one-image batches: more than its one worker had prefetched, so the signalled worker must keep
    serving), exits 143 with one line, and --resume completes the store an uninterrupted job writes."""
    cfg = TokenizeConfig(views=ViewConfig(3, "random", seed=1), format="both", shard_size=6, workers=0)
    ref = tokenize(photos, codebook_path, tmp_path / "ref", cfg, progress=False)
    out = tmp_path / "store"
    args = ["tokenize", str(photos), str(codebook_path), str(out), "--views", "3", "--view", "random", "--seed",
            "1", "--format", "both", "--shard-size", "6", "--batch-size", "1", "--quiet"]  # fmt: skip
    # SIGTERM to the job and its loader worker while the first batch of shard 0 is encoded
    rc, err = run_preempted(
        "cli.tokenkit", "tokenkit.tokenize_job:_TokenShard.add", 1, [*args, "--workers", "1"]
    )
    assert rc == 143, err[-2000:]
    assert f"tokenkit: stopped by SIGTERM after work shard 0: {out} resumes with --resume" in err
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    # what changes the bytes is the job's identity: a resume at another precision is refused, naming it ...
    before = tree_bytes(out)
    assert main([*args, "--workers", "0", "--resume", "--precision", "bf16"]) == 2
    assert 'compute.precision: "fp32" -> "bf16"' in capsys.readouterr().err and tree_bytes(out) == before
    # ... what does not (batch size, workers) may change: the store is the uninterrupted job's, byte for byte
    assert main([*args[:-2], "4", "--quiet", "--workers", "0", "--resume"]) == 0
    assert tree_bytes(out) == tree_bytes(ref)


def test_two_rank_torchrun_equals_one_process(tmp_path, photos, codebook_path, store_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "cli.tokenkit",
        "tokenize",
        str(photos),
        str(codebook_path),
        str(out),
        "--views",
        "3",
        "--view",
        "random",
        "--seed",
        "1",
        "--format",
        "both",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--workers",
        "0",
        "--quiet",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert tree_bytes(out) == tree_bytes(store_path)


def test_features_of_skipped_and_stored_rows(features_store):
    from tokenkit.features import FeatureStore

    fs = FeatureStore.open(features_store)
    assert fs.manifest["n_ok"] == 12 and fs.manifest["patches_per_image"] == 16
    x = fs.sample(10**6)
    assert x.shape == (12 * 16, 96) and x.dtype == np.float32
    # float16 (the torch k-means backend's input) is the same sample without the float32 copy
    half = fs.sample(10**6, dtype=np.float16)
    assert half.dtype == np.float16 and np.array_equal(half.astype(np.float32), x)
    assert np.array_equal(fs.sample(50, seed=3, dtype=np.float16).astype(np.float32), fs.sample(50, seed=3))
    # the stored fp16 features are the encoder's center-view features
    img = decode_image((Path(fs.manifest["source"]["root"]) / "even/astronaut.jpg").read_bytes())
    spec = fs.encoder
    from tokenkit.views import center_box

    v = (*center_box(*img.size), 0)
    f = load_encoder(spec)(to_tensor(render_view(img, v, spec.image_size), spec.mean, spec.std)[None])[0]
    row = list(fs.group["keys"][:]).index("even/astronaut")
    stored = fs.group["features"][row].astype(np.float32)
    order = fs.group["patch"][row]
    assert np.allclose(stored, f.numpy()[order], atol=2e-2 * float(f.abs().max()))


def test_webdataset_tar_source_gives_the_folder_store(tmp_path, photos, codebook_path, store_path):
    """The same images as webdataset shards (key = folder key, .cls = folder label) tokenize identically."""
    folder = TokenStore.open(store_path)
    keys = folder.read(np.arange(len(folder)))["keys"]
    for shard, chunk in enumerate((keys[:7], keys[7:])):
        members = [
            (name, data)
            for key in chunk
            for name, data in (
                (f"{key}.jpg", (photos / f"{key}.jpg").read_bytes()),
                (f"{key}.cls", b"0" if key.startswith("even/") else b"1"),
            )
        ]
        make_tar(tmp_path / f"src-{shard}.tar", members)
    out = tokenize(
        str(tmp_path / "src-{0..1}.tar"), codebook_path, tmp_path / "from-tars", CFG, progress=False
    )
    tars = TokenStore.open(out)
    a, b = tars.read(np.arange(len(tars))), folder.read(np.arange(len(folder)))
    assert a["keys"] == b["keys"]
    for name in ("tokens", "views", "labels"):
        assert np.array_equal(a[name], b[name]), name
    assert tars.image_bytes(3) == folder.image_bytes(3)
    assert [s["ext"] for p in tars.tar_paths() for s in iter_tar(p)] == ["jpg"] * 12
    assert verify(out) == []


def test_views_render_the_official_pretraining_input():
    """The center view is what the official MaPeT pre-training feeds the student: timm's
    RandomResizedCropAndInterpolation with scale (1, 1) and ratio (1, 1) (its config), i.e. the integer central
    square cropped, then resized bicubic: the same pixels. Any box and flip is what torchvision's resized_crop
    gives (the crop BEiT's two-view transform runs), also with Lanczos (its 112-px DALL-E view)."""
    import skimage.data
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    timm_transforms = pytest.importorskip("timm.data.transforms")
    rrc = timm_transforms.RandomResizedCropAndInterpolation(
        224, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation="bicubic"
    )
    for name in ("astronaut", "chelsea", "coffee", "rocket"):  # square, 451x300, 600x400, 640x427
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        ours = np.asarray(render_view(img, (*center_box(*img.size), 0), 224))
        assert np.array_equal(ours, np.asarray(rrc(img))), name
        x, y, w, h = 17, 23, img.width // 2 + 5, img.height // 3 + 2
        for interp, mode in (("bicubic", InterpolationMode.BICUBIC), ("lanczos", InterpolationMode.LANCZOS)):
            ref = TF.hflip(TF.resized_crop(img, y, x, h, w, [112, 112], mode))
            assert np.array_equal(np.asarray(render_view(img, (x, y, w, h, 1), 112, interp)), np.asarray(ref))
