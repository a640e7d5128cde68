"""What each tokenizer family costs per image: the tokenizer's own compute on views already decoded.

    python bench/tokenizer_cost.py [--device cpu|cuda] [--batch 8] [--threads 2] [--families ...]

Each tokenizer is built at the size its paper uses, with random weights (the cost does not depend on them)
and K = 8192: k-CLIP (OpenAI CLIP RN50x64 at 448 px, 14 x 14 x 4096 features, MaPeT), CLIP ViT-B/16 k-means
(224 px), DINOv2 ViT-B/14 k-means through timm (224 px, grid 16), HOG k-means (MaskFeat's HOG, 224 px,
108-d), VQ-KD (BEiT v2, ViT-B/16 at 224 px) and the DALL-E dVAE encoder (BEiT, 112 px). Times `tok(pixels)`
(normalisation, the network, the assignment) on a batch of uint8 views, after one warm-up batch; the median of
`--repeats`. Prints ms per image and images per second, one markdown row a family.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict

import numpy as np
import torch

from tokenkit.codebook import Codebook
from tokenkit.encoders import load_encoder, resolve_spec
from tokenkit.encoders.dalle import DalleConfig, DalleEncoder
from tokenkit.encoders.vqkd import VQKD, VQKDConfig
from tokenkit.quantizer import Quantizer
from tokenkit.tokenizer import CodebookTokenizer, QuantizerTokenizer

K = 8192
FAMILIES = {  # name: (what, how to build the tokenizer)
    "kclip": "k-CLIP: CLIP RN50x64, 448 px, k-means",
    "clip-vit": "CLIP ViT-B/16, 224 px, k-means",
    "dinov2": "DINOv2 ViT-B/14 (timm), 224 px, k-means",
    "hog": "HOG (MaskFeat), 224 px, k-means",
    "vqkd": "VQ-KD (BEiT v2), ViT-B/16, 224 px",
    "dalle": "DALL-E dVAE encoder (BEiT), 112 px",
}


def random_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) * 0.02 for k, v in net.state_dict().items()}


def build(name: str, device: torch.device, precision: str):
    if name in ("vqkd", "dalle"):
        cfg = VQKDConfig() if name == "vqkd" else DalleConfig()
        net = VQKD(cfg) if name == "vqkd" else DalleEncoder(cfg)
        return QuantizerTokenizer(Quantizer(name, asdict(cfg), random_weights(net), {}), device, precision)
    spec = {
        "kclip": lambda: resolve_spec("RN50x64", "none", grid=14),
        "clip-vit": lambda: resolve_spec("ViT-B-16", "none", grid=14),
        "dinov2": lambda: resolve_spec("timm:vit_base_patch14_dinov2", "none", grid=16),
        "hog": lambda: resolve_spec("hog", grid=14),
    }[name]()
    enc = load_encoder(spec, device)
    centroids = np.random.default_rng(0).standard_normal((K, enc.dim), dtype=np.float32)
    return CodebookTokenizer(
        Codebook(centroids, spec, {"kmeans": {"metric": "l2"}}), device, precision, encoder=enc
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"| tokenizer | K | grid | ms / image | images / s |  ({dev_name}, batch {args.batch}, {args.precision})"
    )
    print("|---|---|---|---|---|")
    for name in args.families:
        tok = build(name, device, args.precision)
        S = tok.image_size
        pixels = torch.randint(0, 256, (args.batch, S, S, 3), dtype=torch.uint8).to(device)
        tok(pixels)  # warm-up
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tok(pixels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times) / args.batch
        print(
            f"| {FAMILIES[name]} | {tok.k} | {tok.grid}x{tok.grid} | {1000 * t:.1f} | {1 / t:.1f} |",
            flush=True,
        )
        del tok


if __name__ == "__main__":
    main()
