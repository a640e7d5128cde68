"""Parity of tokenkit's k-CLIP tokens with the official k-CLIP code (aimagelab/MaPeT, data/kmeans/): its CLIP
port and `intermediate_features`, its preprocessing, and its faiss nearest-centroid search.

    python bench/kclip_parity.py --official ~/src/MaPeT [--model RN50] [--k 256]

The same random-init open_clip weights (no weights can be downloaded here; the paper's are RN50x64's) are
loaded into the official CLIP port (its build_model from the state dict) and into tokenkit's GridEncoder.
Photos from scikit-image (square and not) go through: (1) preprocessing - the official CLIP transform
(Resize + CenterCrop, CLIP mean / std) against tokenkit's center view (its integer central square; see
docs/reproduce-paper.md for why they differ on non-square images); (2) features of the same input tensor -
the official last-stage output before attention pooling against GridEncoder; (3) assignment of those features
to K centroids - the official faiss IndexFlatL2 search against tokenkit.kmeans.assign; (4) end to end, each
photo's tokens from the official pipeline against Tokenizer.encode_image. Features must agree to float32
rounding and every assignment must agree except exact-distance ties; preprocessing and end-to-end agreement
are reported (identical on square photos). Exits 1 on a mismatch. Needs faiss and a checkout of the
official code (this project ships none of it).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import open_clip
import skimage.data
import torch
from PIL import Image
from reference_code import import_reference, rel

from tokenkit.codebook import Codebook
from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.kmeans import _faiss, assign
from tokenkit.tokenizer import CodebookTokenizer
from tokenkit.views import center_box, render_view, to_tensor

# 512², 600x400, 451x300, 640x427, 512² grey, and astronaut at 500x375, ImageNet's most common size
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "astronaut@500x375")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, metavar="REPO", help="checkout of aimagelab/MaPeT")
    ap.add_argument("--model", default="RN50", help="an open_clip ResNet CLIP (the paper: RN50x64)")
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faiss = _faiss()  # the official search
    (clip,) = import_reference(
        f"{args.official}/data/kmeans", ["clip"], "the official k-CLIP code", "--official", needs_timm=False
    )

    spec = resolve_spec(args.model, "none", grid=args.grid, seed=args.seed)
    ours = load_encoder(spec)
    torch.manual_seed(args.seed)
    state = open_clip.create_model(args.model, pretrained=None).state_dict()
    state.update({f"visual.{k}": v for k, v in ours.visual.state_dict().items()})  # the same visual weights
    # build_model stores the weights in float16 (OpenAI's checkpoints hold float16 weights too): give ours the
    # same rounded values
    theirs = clip.build_model(state).float().eval().visual
    ours.visual.load_state_dict(theirs.state_dict())
    transform = clip._transform(spec.image_size)

    images = []
    for name in PHOTOS:
        a = getattr(skimage.data, name.split("@")[0])()
        img = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a).convert("RGB")
        if "@" in name:
            img = img.resize(tuple(int(v) for v in name.split("@")[1].split("x")), Image.Resampling.BICUBIC)
        images.append(img)
    print(
        f"{args.model} at {spec.image_size} px (grid {spec.grid}), random init, K {args.k}; official vs tokenkit"
    )

    # (1) preprocessing: the official CLIP transform against tokenkit's center view
    def center_view(img):  # (1, 3, S, S), as `tokenkit tokenize --view center` renders it
        return to_tensor(render_view(img, (*center_box(*img.size), 0), spec.image_size), spec.mean, spec.std)[
            None
        ]

    x_theirs = torch.stack([transform(img) for img in images])  # (n, 3, S, S)
    x_ours = torch.cat([center_view(img) for img in images])
    for name, img, a, b in zip(PHOTOS, images, x_theirs, x_ours, strict=True):
        d = (a - b).abs()
        print(
            f"  input {name} {img.size[0]}x{img.size[1]}: largest difference {float(d.max()):.3f}, "
            f"mean {float(d.mean()):.4f} (normalised units)"
        )

    # (2) features of the same input
    with torch.no_grad():
        f_theirs = theirs.intermediate_features(x_theirs)  # (n, G*G, C)
        f_ours = ours(x_theirs)
    f_diff = rel(f_ours, f_theirs)
    print(f"  features of the same input: {tuple(f_ours.shape)}, largest relative difference {f_diff:.2e}")

    # (3) assignment of the same features
    flat = f_theirs.flatten(0, 1).numpy()  # (n*G*G, C)
    rng = np.random.default_rng(args.seed)
    centroids = flat[rng.choice(len(flat), args.k, replace=False)] + rng.normal(
        0, flat.std() * 0.1, (args.k, flat.shape[1])
    )
    centroids = centroids.astype(np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    _, codes_theirs = index.search(np.ascontiguousarray(flat), 1)
    codes_ours = assign(torch.from_numpy(flat), torch.from_numpy(centroids), "l2")
    codes_theirs = torch.from_numpy(codes_theirs[:, 0])
    differ = (codes_ours != codes_theirs).nonzero()[:, 0]
    d2 = torch.cdist(torch.from_numpy(flat).double(), torch.from_numpy(centroids).double()) ** 2
    ties = [float(abs(d2[i, codes_ours[i]] - d2[i, codes_theirs[i]]) / d2[i].min()) for i in differ]
    real = sum(t > 1e-5 for t in ties)
    print(f"  assignment of {len(flat)} features: {len(differ)} differ ({real} beyond a 1e-5 relative tie)")

    # (4) end to end
    cb = Codebook(centroids, spec, {"kmeans": {"metric": "l2"}})
    tok = CodebookTokenizer(cb, torch.device("cpu"), "fp32", encoder=ours)
    for name, img, x in zip(PHOTOS, images, x_theirs, strict=True):
        with torch.no_grad():
            f = theirs.intermediate_features(x[None]).numpy()[0]
        _, c = index.search(np.ascontiguousarray(f), 1)
        mine = tok.encode_image(img).flatten()
        print(f"  tokens of {name}: {float((mine == torch.from_numpy(c[:, 0])).float().mean()):.1%} equal")

    bad = f_diff > 1e-4 or real > 0
    print(f"  {'MISMATCH' if bad else 'match'}: features (tolerance 1e-4) and assignment (ties aside)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
