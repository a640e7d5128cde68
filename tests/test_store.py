"""verify finds every kind of damage, naming the shard; readers refuse incomplete or newer stores."""

import json
import shutil

import numpy as np
import pytest
import zarr

from tokenkit.codebook import Codebook
from tokenkit.errors import CodebookError, StoreError
from tokenkit.store import TokenStore, verify
from tokenkit.tokenize_job import TokenizeConfig, tokenize
from tokenkit.views import ViewConfig


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, photos, codebook_path):
    out = tmp_path_factory.mktemp("pristine") / "store"
    cfg = TokenizeConfig(views=ViewConfig(2, "random"), format="both", shard_size=4, workers=0)
    return tokenize(photos, codebook_path, out, cfg, progress=False)


@pytest.fixture
def store(tmp_path, pristine):
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


def test_pristine_store_verifies(pristine):
    assert verify(pristine) == []


def rewrite_consistently(store, shard: int, name: str, change) -> None:
    """Change array `name` in `shard` through zarr, then update every checksum (the shard file's, the
    manifest's own) as a buggy writer would: only the values' checks can find it."""
    import zarr

    from tokenkit.journal import manifest_sha256, sha256_file

    a = zarr.open_array(str(store / name), mode="r+")
    s, e = shard * 4, shard * 4 + 4
    a[s:e] = change(a[s:e])
    m = json.loads((store / "manifest.json").read_text())
    rel = f"{name}/c/{shard}" + "/0" * (a.ndim - 1)
    m["shards"][shard]["sha256"][rel] = sha256_file(store / rel)
    m["manifest_sha256"] = manifest_sha256(m)
    (store / "manifest.json").write_text(json.dumps(m))


def test_verify_checks_metadata_manifest_and_values(store, pristine, tmp_path):
    """The zarr metadata (a byte order flipped: ids read back as 256 x larger), the manifest (classes
    reversed: every label would mean the other class) and the stored values themselves."""
    meta = store / "tokens" / "zarr.json"
    m = json.loads(meta.read_text())
    m["codecs"][0]["configuration"]["codecs"][0]["configuration"]["endian"] = "big"
    meta.write_text(json.dumps(m))
    (msg,) = verify(store)
    assert "tokens/zarr.json: zarr metadata changed since tokenize" in msg
    for name, change, want in (
        ("tokens", lambda t: t + 1000, "token id 10"),
        ("views", lambda v: v * np.array([1, 1, 0, 1, 1], np.int32), "a crop box outside the image"),
        ("labels", lambda y: y + 5, "out of [-1, 2) for 2 classes"),
    ):
        root = tmp_path / name
        shutil.copytree(pristine, root)
        rewrite_consistently(root, 1, name, change)
        problems = verify(root)
        assert any(want in p for p in problems), (name, problems)
    bad = tmp_path / "classes"
    shutil.copytree(pristine, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["source"]["classes"] = m["source"]["classes"][::-1]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json: its content does not match its checksum"):
        TokenStore.open(bad)
    assert "does not match its checksum" in verify(bad)[0]


def test_flipped_byte(store):
    p = store / "tokens/c/1/0/0/0"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    (msg,) = verify(store)
    assert "tokens/c/1/0/0/0: shard 1 sha256 mismatch" in msg


def test_truncated_and_missing_shards(store):
    for n in (1, 2):
        tar = store / f"wds/shard-00000{n}.tar"
        tar.write_bytes(tar.read_bytes()[:1000])
    (store / "views/c/0/0/0").unlink()
    problems = verify(store)
    assert any("views/c/0/0/0: shard 0 is missing" in p for p in problems)
    assert any("shard-000002.tar: shard 2 sha256 mismatch" in p for p in problems)
    # ranks sharing the work (shard i on rank i % 2) find the same problems between them
    by_rank = [verify(store, rank=r, world=2) for r in (0, 1)]
    assert sorted(by_rank[0] + by_rank[1]) == sorted(problems)
    assert len(by_rank[1]) == 1 and "shard-000001.tar: shard 1" in by_rank[1][0]  # odd shards: rank 1's


def test_duplicated_key_is_found_even_with_matching_checksums(store):
    m = json.loads((store / "manifest.json").read_text())
    # copy shard 0's tar over shard 1's and update the checksum, as a botched merge would
    src, dst = store / "wds/shard-000000.tar", store / "wds/shard-000001.tar"
    dst.write_bytes(src.read_bytes())
    from tokenkit.journal import manifest_sha256, sha256_file

    m["shards"][1]["sha256"]["wds/shard-000001.tar"] = sha256_file(dst)
    m["manifest_sha256"] = manifest_sha256(m)  # the merge rewrote the manifest whole
    (store / "manifest.json").write_text(json.dumps(m))
    problems = verify(store)
    assert any("also appears in an earlier shard" in p for p in problems)
    # the index saved beside shard 1 still lists shard 1's own samples: named, not trusted
    assert any("shard-000001.idx.npy: does not list the samples of" in p for p in problems)


def test_tar_indexes_list_each_tars_samples(pristine):
    """Each tar's saved index is its header-only index, and is checksummed with the store."""
    from tokenkit.wds import index_tar, load_index

    st = TokenStore.open(pristine)
    indexes = st.tar_indexes()
    assert len(indexes) == len(st.tar_paths()) == 3
    for tar, ix in zip(st.tar_paths(), indexes, strict=True):
        assert ix.name == tar.name.replace(".tar", ".idx.npy")
        assert load_index(ix) == index_tar(tar) and len(load_index(ix)) == 4
    files = json.loads((pristine / "manifest.json").read_text())["shards"][0]["sha256"]
    assert "wds/shard-000000.idx.npy" in files


def test_written_tar_index_matches_its_headers_for_any_name_and_size(tmp_path):
    """write_tar saves the byte ranges it wrote (no re-parse): they must be what the member headers say,
    also for names that need a PAX header (long, non-ASCII) and sizes at the 512-byte block edges."""
    from tokenkit.wds import index_tar, load_index, write_tar

    rng = np.random.default_rng(0)
    keys = ["a", "k" * 180, "d/ünï-cödé", "e", "f", "g"]
    sizes = [0, 1, 511, 512, 513, 3000]
    samples = [
        {"key": k, "ext": "jpg", "data": rng.bytes(n), "record": rng.bytes(100 + 37 * i)}
        for i, (k, n) in enumerate(zip(keys, sizes, strict=True))
    ]
    tar = tmp_path / "shard-000000.tar"
    refs = load_index(write_tar(tar, samples))
    assert refs == index_tar(tar)
    raw = tar.read_bytes()
    for r, s in zip(refs, samples, strict=True):
        (io, isz), (ro, rsz) = r.image, r.record
        assert (r.key, r.ext) == (s["key"], "jpg")
        assert raw[io : io + isz] == s["data"] and raw[ro : ro + rsz] == s["record"]


def test_damaged_tar_index(store):
    ix = store / "wds/shard-000002.idx.npy"
    ix.write_bytes(ix.read_bytes()[:-8])
    (msg,) = verify(store)
    assert "shard-000002.idx.npy: shard 2 sha256 mismatch" in msg


def test_codebook_mismatch(store, tmp_path):
    cb = Codebook.load(store / "tokenizer.safetensors")
    Codebook(cb.centroids + 1, cb.encoder, cb.meta).save(store / "tokenizer.safetensors")
    (msg,) = verify(store)
    assert "do not match" in msg and "tokenizer.safetensors" in msg
    (store / "tokenizer.safetensors").write_bytes(b"\x80\x04pickle-ish")  # a pickle planted in its place
    with pytest.raises(CodebookError, match="not a tokenkit safetensors file"):
        Codebook.load(store / "tokenizer.safetensors")
    assert "not a tokenkit safetensors file" in verify(store)[0]


def test_newer_format_and_unfinished_stores_are_refused(store):
    m = json.loads((store / "manifest.json").read_text())
    m["format_version"] = 99
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="format_version 99 is newer"):
        TokenStore.open(store)
    (store / "manifest.json").unlink()
    (store / "_job.json").write_text("{}")
    with pytest.raises(StoreError, match="has not finished; re-run it with --resume"):
        TokenStore.open(store)


def test_check_compatible_names_both_values(pristine):
    s = TokenStore.open(pristine)
    s.check_compatible(tokenizer_id=s.tokenizer_id, k=16, grid=4, num_views=2)
    with pytest.raises(StoreError, match="store K 16 != expected 8192"):
        s.check_compatible(k=8192)
    with pytest.raises(StoreError, match="grid 4 != expected 14"):
        s.check_compatible(grid=14)


def test_skipped_images_are_listed_and_rows_stay_aligned(tmp_path, photos, codebook_path):
    src = tmp_path / "src"
    shutil.copytree(photos, src)
    (src / "odd" / "broken.jpg").write_bytes(b"not an image")
    (src / "even" / "empty.png").write_bytes(b"")
    out = tokenize(
        src, codebook_path, tmp_path / "out", TokenizeConfig(shard_size=4, workers=0), progress=False
    )
    s = TokenStore.open(out)
    assert len(s) == 12 and s.manifest["n"] == 14
    assert sorted(k for k, _ in s.manifest["skipped"]) == ["even/empty", "odd/broken"]
    assert all(k not in ("odd/broken", "even/empty") for k in s.read(np.arange(len(s)))["keys"])
    assert verify(out) == []


def test_webdataset_reads_the_shards_as_the_store_holds_them(pristine):
    """The tar shards are plain webdataset: the webdataset library groups each sample's two members (the
    image, one structured tokens.npy record) by key, and the record's fields are the zarr arrays' rows."""
    import webdataset as wds

    st = TokenStore.open(pristine)
    g = zarr.open_group(str(pristine), mode="r")
    rows = {str(k): i for i, k in enumerate(g["keys"][...])}
    seen = 0
    for sample in wds.WebDataset([str(p) for p in st.tar_paths()], shardshuffle=False).decode("rgb8"):
        i, rec = rows[sample["__key__"]], sample["tokens.npy"]
        assert np.array_equal(rec["tokens"], g["tokens"][i]) and np.array_equal(rec["views"], g["views"][i])
        assert int(rec["label"]) == int(g["labels"][i])
        (image,) = [v for k, v in sample.items() if k in ("jpg", "jpeg", "png")]  # decoded by webdataset
        assert image.ndim == 3 and image.shape[2] == 3
        seen += 1
    assert seen == int((g["status"][...] == 0).sum()) > 0
