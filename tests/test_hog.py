"""HOG features (tokenkit/encoders/hog.py): scikit-image's HOG on real photos, MaskFeat's layout, the spec."""

import numpy as np
import pytest
import skimage.data
import skimage.feature
import torch
from PIL import Image

from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.encoders.hog import HOGConfig, gaussian_window
from tokenkit.encoders.spec import EncoderSpec
from tokenkit.errors import ConfigError
from tokenkit.views import normalize


def photo(name: str, side: int) -> np.ndarray:
    img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    return np.asarray(img.resize((side, side), Image.Resampling.BICUBIC))


def cells(f: torch.Tensor, G: int, u: int, c: int, bins: int) -> np.ndarray:
    """(1, G*G, c*bins*u*u) patch features -> (G*u, G*u, c, bins) cell histograms."""
    return f.reshape(G, G, c, bins, u, u).permute(0, 4, 1, 5, 2, 3).reshape(G * u, G * u, c, bins).numpy()


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_equals_scikit_image_hog_on_real_photos(name):
    """With scikit-image's settings (central differences, the strongest channel per pixel, no window, one
    cell per block, L2), every cell histogram is skimage.feature.hog's, and every pixel lands in the same bin
    (skimage sums its votes in float32: differences stay below 1e-6)."""
    img = photo(name, 224)
    spec = resolve_spec(
        "hog", grid=14, image_size=224, hog_cfg=HOGConfig(gradient="central", channels="max", window=0)
    )
    x = normalize(torch.from_numpy(img.copy())[None], spec.mean, spec.std).double()  # 0-255 pixels
    ours = cells(load_encoder(spec).double()(x)[0], 14, 2, 1, 9)[:, :, 0]  # (28, 28, 9)
    ref = skimage.feature.hog(
        img,
        orientations=9,
        pixels_per_cell=(8, 8),
        cells_per_block=(1, 1),
        block_norm="L2",
        feature_vector=False,
        channel_axis=-1,
    )[:, :, 0, 0]  # (28, 28, 9)
    assert np.abs(ours - ref).max() < 1e-6
    assert (
        np.abs(np.linalg.norm(ours, axis=-1) - 1).max() < 1e-6 or (np.linalg.norm(ours, axis=-1) == 0).any()
    )


def test_maskfeat_defaults_layout_and_determinism():
    """MaskFeat's target: per RGB channel, 9 bins, 8-px cells in 16-px patches = 108 values per patch, each
    cell histogram of unit norm; the Gaussian window weights each 16-px tile's pixels."""
    spec = resolve_spec("hog", grid=7)
    assert (spec.family, spec.image_size, spec.weights_id) == ("hog", 112, "none")
    assert dict(spec.options) == {
        "cell": 8,
        "bins": 9,
        "gradient": "sobel",
        "channels": "each",
        "window": 16,
        "eps": 1e-5,
    }
    enc = load_encoder(spec)
    x = torch.from_numpy(np.stack([photo("astronaut", 112), photo("coffee", 112)]))
    f = enc(normalize(x, spec.mean, spec.std))
    assert f.shape == (2, 49, 108) and enc.dim == 108 and f.dtype == torch.float32
    h = cells(f[:1], 7, 2, 3, 9)  # (14, 14, 3, 9)
    norms = np.linalg.norm(h, axis=-1)  # 1 but where eps damps a nearly flat cell
    assert norms.max() < 1 + 1e-6 and np.median(norms) > 1 - 1e-5
    assert torch.equal(f, load_encoder(spec)(normalize(x, spec.mean, spec.std)))
    w = gaussian_window(16)
    assert w.sum() == pytest.approx(1) and w[7, 7] == w.max() and w[0, 0] == w.min()
    # the window changes the votes, not the layout
    plain = load_encoder(resolve_spec("hog", grid=7, hog_cfg=HOGConfig(window=0)))(
        normalize(x, spec.mean, spec.std)
    )
    assert plain.shape == f.shape and not torch.allclose(plain, f)


def test_every_setting_is_in_the_spec_and_bad_ones_are_refused():
    spec = resolve_spec("hog", grid=4, image_size=64, hog_cfg=HOGConfig(cell=4, bins=12, channels="max"))
    assert EncoderSpec.from_dict(spec.to_dict()) == spec
    assert load_encoder(spec).dim == 1 * 12 * 4 * 4
    with pytest.raises(ConfigError, match="--hog-cell 6: must be a divisor of the 16-px patch"):
        resolve_spec("hog", grid=14, hog_cfg=HOGConfig(cell=6))
    with pytest.raises(ConfigError, match="--image-size 100 with --grid 14"):
        resolve_spec("hog", grid=14, image_size=100)
    with pytest.raises(ConfigError, match="--hog-window 24: must divide --image-size 224"):
        resolve_spec("hog", grid=14, hog_cfg=HOGConfig(window=24))
    with pytest.raises(ConfigError, match="--hog-bins 1"):
        resolve_spec("hog", grid=14, hog_cfg=HOGConfig(bins=1))
