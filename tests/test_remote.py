"""IMAGES as URLs (tokenkit/remote.py): shards served over HTTP from 127.0.0.1 and through `pipe:cat` give
the store the same local files give; a URL that cannot be fetched is one line, and leaves nothing cached."""

import functools
import http.server
import io
import json
import shutil
import threading

import numpy as np
import pytest
import zarr
from PIL import Image

from cli.mapet import main as mapet_main
from cli.tokenkit import main
from tests.tars import make_tar
from tokenkit.remote import cache_dir


@pytest.fixture
def shards(tmp_path, photos, monkeypatch):
    """The test photos in two tar shards, and a local HTTP server over their folder."""
    monkeypatch.setenv("TOKENKIT_SHARD_CACHE", str(tmp_path / "cache"))
    files = sorted(photos.rglob("*.jpg"))
    root = tmp_path / "served"
    root.mkdir()
    for s in range(2):
        members = []
        for i, f in enumerate(files[s::2]):
            buf = io.BytesIO()
            Image.open(f).save(buf, "JPEG", quality=90)
            members += [(f"s{s}_{i:03d}.jpg", buf.getvalue()), (f"s{s}_{i:03d}.cls", str(i % 2).encode())]
        make_tar(root / f"shard-{s:06d}.tar", members)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def arrays(store) -> dict:
    g = zarr.open_group(str(store), mode="r")
    return {k: np.asarray(g[k][...]) for k in ("tokens", "views", "labels", "keys", "crc32")}


def test_http_and_pipe_shards_give_the_local_files_store(shards, tmp_path, codebook_path, capsys):
    root, url = shards
    common = [str(codebook_path), "--views", "2", "--workers", "0", "--quiet"]
    stores = {
        "local": str(root / "shard-{000000..000001}.tar"),
        "http": url + "/shard-{000000..000001}.tar",
        "pipe": f"pipe:cat {root}/shard-{{000000..000001}}.tar",
    }
    got = {}
    for name, images in stores.items():
        assert main(["tokenize", images, *common[:1], str(tmp_path / name), *common[1:]]) == 0, (
            capsys.readouterr()
        )
        got[name] = arrays(tmp_path / name)
    for name in ("http", "pipe"):
        for k, v in got["local"].items():
            assert np.array_equal(got[name][k], v), (name, k)
    assert len(list(cache_dir().glob("*-shard-00000?.tar"))) == 4  # http and pipe, two shards each
    source = json.loads((tmp_path / "http" / "manifest.json").read_text())["source"]
    assert source["tars"][0] == url + "/shard-000000.tar"  # the store names its shards' URLs...
    shutil.rmtree(cache_dir())  # ... so another machine, or an emptied cache, fetches them again
    assert main(["verify", str(tmp_path / "http"), "--sources"]) == 0, capsys.readouterr()
    assert len(list(cache_dir().glob("*-shard-00000?.tar"))) == 2


def test_a_url_that_cannot_be_fetched_is_one_line(shards, tmp_path, codebook_path, capsys):
    _, url = shards
    for images in (url + "/missing.tar", "pipe:false"):
        assert main(["tokenize", images, str(codebook_path), str(tmp_path / "t"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{images}: could not be fetched" in err and len(err.strip().splitlines()) == 1, err
    assert not cache_dir().exists() or not any(cache_dir().iterdir())  # no partial shard kept


def test_training_reads_a_token_store_from_its_url(tmp_path, photos, codebook_path, monkeypatch, capsys):
    """`mapet pretrain --tokens http://...`: the store is mirrored, each file checked against its manifest,
    and the run equals the one on the local folder; a file changed on the server is refused in one line."""
    from tests.runs import training_store

    monkeypatch.setenv("TOKENKIT_SHARD_CACHE", str(tmp_path / "cache"))
    store = training_store(tmp_path / "served" / "tokens", photos, codebook_path)
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tokens"
    small = ["--model", "mapet_micro", "--image-size", "64", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3",
             "--warmup-epochs", "0.5", "--workers", "0", "--log-every", "1", "--quiet"]  # fmt: skip
    try:
        for name, tokens in (("local", str(store)), ("remote", url)):
            assert mapet_main(["pretrain", "--tokens", tokens, "--out", str(tmp_path / name), *small]) == 0
        lines = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("local", "remote")]
        assert [json.loads(x)["loss"] for x in lines[0]] == [json.loads(x)["loss"] for x in lines[1]]
        chunk = next((store / "tokens" / "c").rglob("*"))
        while chunk.is_dir():
            chunk = next(chunk.iterdir())
        chunk.write_bytes(chunk.read_bytes()[::-1])  # the server's copy changes; a new machine mirrors it
        monkeypatch.setenv("TOKENKIT_SHARD_CACHE", str(tmp_path / "cache2"))
        assert mapet_main(["pretrain", "--tokens", url, "--out", str(tmp_path / "again"), *small]) == 2
        err = capsys.readouterr().err
        assert "its sha256 is not the manifest's" in err and len(err.strip().splitlines()) == 1
    finally:
        server.shutdown()


def test_other_schemes_are_read_through_fsspec(shards, tmp_path, codebook_path):
    """A scheme webdataset has no opener for goes through fsspec: here its in-memory filesystem, standing in
    for s3:// or gs:// (whose packages this machine has no service for)."""
    fsspec = pytest.importorskip("fsspec")
    root, _ = shards
    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/shards/shard-{s:06d}.tar", (root / f"shard-{s:06d}.tar").read_bytes())
    common = [str(codebook_path), "--views", "2", "--workers", "0", "--quiet"]
    for name, images in (("local", str(root / "shard-{000000..000001}.tar")),
                         ("memory", "memory://shards/shard-{000000..000001}.tar")):  # fmt: skip
        assert main(["tokenize", images, common[0], str(tmp_path / name), *common[1:]]) == 0
    for k, v in arrays(tmp_path / "local").items():
        assert np.array_equal(arrays(tmp_path / "memory")[k], v), k


def test_a_store_manifest_naming_files_outside_the_store_is_refused(tmp_path, monkeypatch):
    """A served manifest is data from elsewhere: a file name that climbs out of the mirror is refused."""
    from tokenkit.errors import SourceError
    from tokenkit.store import TokenStore

    monkeypatch.setattr("tokenkit.remote._CACHE", {"dir": tmp_path / "cache"})
    served = tmp_path / "served" / "evil"
    served.mkdir(parents=True)
    (served / "manifest.json").write_text(json.dumps({"metadata": {"../../outside": "0" * 64}, "shards": []}))
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SourceError, match="lists a file outside the store"):
            TokenStore.open(f"http://127.0.0.1:{server.server_address[1]}/evil")
        with pytest.raises(SourceError, match="a store is read file by file"):
            TokenStore.open(f"pipe:cat {served}")
    finally:
        server.shutdown()
    assert not (tmp_path / "outside").exists()
