"""Bad and unusual images: each is converted correctly or refused with a one-line ImageError."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.tars import make_tar
from tokenkit.errors import ImageError, SourceError
from tokenkit.images import decode_image, list_folder, list_tars, sanitize_key


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_truncated_zero_byte_text_and_tiny_images_are_refused():
    good = encode(Image.new("RGB", (64, 48), (10, 20, 30)), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(good[: len(good) // 2], "cut.jpg")
    with pytest.raises(ImageError, match="empty file"):
        decode_image(b"", "zero.jpg")
    with pytest.raises(ImageError, match=r"^text.jpg: not a usable image \(no image format Pillow reads\)"):
        decode_image(b"hello, I am text\n" * 10, "text.jpg")
    with pytest.raises(ImageError, match="1x1 is smaller than the 4-pixel"):
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), "dot.png", min_side=4)


def test_16bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(3, 0)
    img = decode_image(encode(Image.fromarray(a), "PNG"), "deep.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_palette_alpha_and_grey():
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), "cmyk.jpg")
    r, g, b = np.asarray(cmyk)[4, 4]
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # pure red stays red
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1  # index 1 (red) is fully transparent -> white background
    out = decode_image(encode(pal, "PNG", transparency=1), "pal.png")
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    assert np.asarray(decode_image(encode(rgba, "PNG"), "a.png"))[0, 0].tolist() == [127, 127, 255]
    assert (
        np.asarray(decode_image(encode(Image.new("L", (4, 4), 77), "PNG"), "g.png"))[0, 0].tolist()
        == [77] * 3
    )


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), "rot.jpg")
    assert out.size == (20, 40)
    a = np.asarray(out).mean(axis=2)
    assert a[:10].mean() > 200 and a[-10:].mean() < 50  # the band is now on top


def test_decompression_bomb_is_refused(monkeypatch):
    import tokenkit.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression-bomb"):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), "bomb.png")


def test_folder_keys_labels_and_collisions(tmp_path):
    for rel in ("cats/a.b.jpg", "cats/c.png", "dogs/d.jpg"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p)
    idx = list_folder(tmp_path)
    assert idx.keys == ("cats/a_b", "cats/c", "dogs/d")  # no dot may remain: webdataset splits on it
    assert idx.labels.tolist() == [0, 0, 1] and idx.classes == ("cats", "dogs")
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a_b.png")
    with pytest.raises(SourceError, match="same key 'cats/a_b'"):
        list_folder(tmp_path)
    assert sanitize_key("x.y/z.w") == "x.y/z_w"


def test_folder_listing_follows_linked_class_folders_and_skips_hidden_and_broken_files(tmp_path):
    """As torchvision's ImageFolder lists: a class folder that is a symlink (ImageNet subsets are often made
    so) is listed; hidden files, non-images and broken links are not."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere" / "dogs"
    for p in (data / "cats" / "a.jpg", data / "cats" / "B.PNG", elsewhere / "d.jpg"):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p, "PNG")
    (data / "dogs").symlink_to(elsewhere, target_is_directory=True)
    (data / "cats" / ".a.jpg").write_bytes(b"hidden")
    (data / "cats" / "notes.txt").write_text("not an image")
    (data / "cats" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    idx = list_folder(data)
    assert idx.locators == ("cats/B.PNG", "cats/a.jpg", "dogs/d.jpg")
    assert idx.labels.tolist() == [0, 0, 1] and idx.classes == ("cats", "dogs")


def test_str_array_is_the_sequence_of_its_strings():
    """keys and locators are StrArrays (one buffer, shared by forked workers): indexing, negative indices,
    slices, iteration, index(), equality with tuples and non-ASCII names as a tuple of str gives them."""
    from tokenkit.images import StrArray

    items = ("a/b", "", "chat/é🙂.jpg", "z" * 300, "a/b")
    arr = StrArray(items)
    assert len(arr) == 5 and list(arr) == list(items) and arr == items and arr == StrArray(items)
    assert [arr[i] for i in range(-5, 5)] == [*items, *items]
    assert arr[1:4] == list(items[1:4]) and arr[::-2] == list(items[::-2])
    assert arr.index("chat/é🙂.jpg") == 2 and arr.count("a/b") == 2 and "" in arr
    assert arr != StrArray(items[:4]) and arr != ("a/b",) and len(StrArray([])) == 0
    for bad in (5, -6):
        with pytest.raises(IndexError):
            arr[bad]


def test_tar_source_reads_images_labels_and_refuses_hostile_members(tmp_path):
    jpg = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")
    make_tar(tmp_path / "s-0.tar", [("k1.jpg", jpg), ("k1.cls", b"3"), ("k2.png", jpg)])
    make_tar(tmp_path / "s-1.tar", [("sub/k3.jpg", jpg)])
    idx = list_tars(str(tmp_path / "s-{0..1}.tar"))
    assert idx.keys == ("k1", "k2", "sub/k3") and idx.labels.tolist() == [3, -1, -1]
    assert idx.read_bytes(2) == jpg
    make_tar(tmp_path / "evil.tar", [("../../etc/x.jpg", jpg)])
    with pytest.raises(SourceError, match="hostile"):
        list_tars(str(tmp_path / "evil.tar"))
    make_tar(tmp_path / "abs.tar", [("/abs/x.jpg", jpg)])
    with pytest.raises(SourceError, match="hostile"):
        list_tars(str(tmp_path / "abs.tar"))
    make_tar(tmp_path / "dup.tar", [("k.jpg", jpg), ("k.jpg", jpg)])
    with pytest.raises(SourceError, match="duplicate member"):
        list_tars(str(tmp_path / "dup.tar"))
    with pytest.raises(SourceError, match="not found"):
        list_tars(str(tmp_path / "s-{0..5}.tar"))


def test_folders_are_read_as_a_careful_user_expects(tmp_path):
    """Hidden folders are skipped like hidden files (a hidden folder would be class 0 and shift every label); a
    link loop is read once; a stray image beside the class folders is named, not allowed to drop every label;
    a file name that is not valid UTF-8 is skipped and listed (it cannot be a key)."""
    png = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    for rel in ("cats/a.png", "dogs/b.png", ".ipynb_checkpoints/c.png", "cats/.thumbs/d.png"):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(png)
    (tmp_path / "src" / "dogs" / "loop").symlink_to(tmp_path / "src" / "dogs")  # a folder linking to itself
    (tmp_path / "src" / "cats" / "self").symlink_to(tmp_path / "src" / "cats" / "self")  # a link to itself
    os_name = b"cats/caf\xe9.png"  # Latin-1, not UTF-8
    with open(bytes(tmp_path / "src") + b"/" + os_name, "wb") as f:
        f.write(png)
    src = list_folder(tmp_path / "src")
    assert src.classes == ("cats", "dogs") and list(src.keys) == ["cats/a", "dogs/b"]
    assert src.labels.tolist() == [0, 1]
    assert src.unlisted == (("cats/caf\\xe9.png", "file name is not valid UTF-8; rename it"),)
    (tmp_path / "src" / "stray.png").write_bytes(png)
    with pytest.raises(
        SourceError, match=r"'stray.png' \(1 images in all\) sits beside the class folders \(cats, dogs"
    ):
        list_folder(tmp_path / "src")


def test_tar_keys_differing_only_in_case_and_out_of_range_labels_are_refused(tmp_path):
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    make_tar(tmp_path / "case.tar", [("Img1.png", png), ("img1.png", png)])
    with pytest.raises(SourceError, match="'img1' differs only in case from 'Img1'"):
        list_tars(str(tmp_path / "case.tar"))
    for raw in (b"-1", str(2**66).encode(), b"2000000000"):
        make_tar(tmp_path / "cls.tar", [("a.png", png), ("a.cls", raw)])
        with pytest.raises(SourceError, match=r"labels must be in \[0, 1048576\)"):
            list_tars(str(tmp_path / "cls.tar"))


def test_wide_modes_are_read_by_their_real_range_or_refused():
    """A float TIFF in [0, 1] is not black, one in [0, 255] not white; 32-bit integers holding 8- or 16-bit
    values are scaled by that range; negative or huge values have no range to read them by: refused."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for values, top in ((ramp, 1.0), (ramp * 255, 255.0)):
        img = decode_image(encode(Image.fromarray(values, "F"), "TIFF"), "f.tif")
        got = np.asarray(img)[..., 0].astype(int)
        assert np.abs(got - np.round(values / top * 255)).max() <= 1
    big = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000  # up to 63000: a 16-bit range
    got = np.asarray(decode_image(encode(Image.fromarray(big, "I"), "TIFF"), "i.tif"))[..., 0]
    assert got[-1, -1] == round(63000 / 65535 * 255) and got[0, 0] == 0
    for bad in (big - 5000, big * 100):
        with pytest.raises(ImageError, match=r"^bad.tif: I-mode image with values in \["):
            decode_image(encode(Image.fromarray(bad, "I"), "TIFF"), "bad.tif")
