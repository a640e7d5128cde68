"""Shared fixtures: real photos from scikit-image, tiny seeded random-init CLIP encoders, a built codebook."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tokenkit.codebook import build_codebook
from tokenkit.encoders import resolve_spec
from tokenkit.features import FeaturesConfig, extract_features
from tokenkit.kmeans import KMeansConfig

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every random-init model

PHOTOS = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "cat",
    "logo",
]


def make_photo_folder(root: Path, names=PHOTOS, side: int = 96) -> Path:
    """Photos resized so the short side is `side`, under two class folders (labels 0 / 1)."""
    for i, name in enumerate(names):
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        s = side / min(img.size)
        img = img.resize(
            (max(side, round(img.width * s)), max(side, round(img.height * s))), Image.Resampling.BICUBIC
        )
        d = root / ("even" if i % 2 == 0 else "odd")
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{name}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def vit_spec():
    return resolve_spec("tokenkit-tiny-vit", "none", grid=4, seed=0)


@pytest.fixture(scope="session")
def features_store(tmp_path_factory, photos, vit_spec) -> Path:
    out = tmp_path_factory.mktemp("feat") / "features"
    extract_features(
        photos, out, vit_spec, FeaturesConfig(max_patches=10_000, shard_size=4, workers=0), progress=False
    )
    return out


@pytest.fixture(scope="session")
def codebook_path(tmp_path_factory, features_store) -> Path:
    out = tmp_path_factory.mktemp("cb") / "codebook.safetensors"
    build_codebook(features_store, out, KMeansConfig(k=16, niter=10, nredo=1, seed=0), progress=False)
    return out
