"""Pooled pixels (tokenkit/encoders/pixels.py): each patch's RGB means over pool x pool cells."""

import pytest
import torch

from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.errors import ConfigError


def test_features_are_the_patch_cell_means():
    spec = resolve_spec("pixels", grid=7)
    assert (spec.family, spec.image_size, dict(spec.options)) == ("pixels", 112, {"pool": 4})
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    f = load_encoder(spec)(x)
    assert f.shape == (2, 49, 48)
    r, c = 3, 5  # patch (3, 5): its 16 x 16 pixels, cells of 4 x 4, channel-major
    patch = x[:, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16].reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))
    assert torch.allclose(f[:, r * 7 + c], patch.reshape(2, 48), atol=1e-6)
    with pytest.raises(ConfigError, match="--image-size 100 with --grid 7"):
        resolve_spec("pixels", grid=7, image_size=100)
