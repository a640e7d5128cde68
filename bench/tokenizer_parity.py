"""Parity of the code-model tokenizers with the code they reproduce, end to end through `tokenkit convert`.

    python bench/tokenizer_parity.py vqkd --beit2 ~/src/unilm/beit2 [--size base] [--dtype float64]
    python bench/tokenizer_parity.py dalle --beit ~/src/unilm/beit

vqkd: BEiT v2's own VQKD class (modeling_vqkd.py, its ViT from modeling_finetune.py and its
NormEMAVectorQuantizer), built as `vqkd_encoder_base_decoder_3x768x12_clip` builds it (the teacher left out:
tokenizing never runs it) with seeded random weights and a random L2-normalised codebook (no weights can
be downloaded here), saved as a checkpoint in its own key layout, converted, and both asked for the codes
of the same views: `get_codebook_indices` on ToTensor'd pixels against `load_tokenizer(...)(pixels)`.
Prints the largest difference of the normalised 32-d projections and the share of equal codes.

dalle: the `dall_e` package's Encoder with seeded random weights, pickled whole as OpenAI's encoder.pkl is,
converted with --trust-pickle; views cut by BEiT's own RandomResizedCropAndInterpolationWithTwoPic (its
transforms.py; the box fixed so both sides crop the same one) at 112 px Lanczos, ToTensor and map_pixels, then
the encoder's argmax, against a store view rendered from the same box. Prints the pixel and logit
differences and the share of equal codes. Neither reference is shipped with this project; the modules
BEiT v2's file imports only for training (`utils`, `vqkd_teacher`) are stood in for by empty modules.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from reference_code import import_reference, rel

from tokenkit.quantizer import convert
from tokenkit.tokenizer import load_tokenizer
from tokenkit.views import render_view, to_uint8, to_unit

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # (width, heads); BEiT v2 ships base


def views(size: int) -> tuple[list[Image.Image], list[tuple[int, int, int, int, int]]]:
    """The photos and one box each: the central square, or a crop off the centre, some flipped."""
    imgs, boxes = [], []
    for n, name in enumerate(PHOTOS):
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        w, h = img.size
        box = (
            (w // 7, h // 9, w // 2 + 3, h // 2 + 7, n % 2)
            if n % 3
            else ((w - min(w, h)) // 2, (h - min(w, h)) // 2, min(w, h), min(w, h), 0)
        )
        imgs.append(img)
        boxes.append(box)
    return imgs, boxes


def vqkd(args) -> int:
    for name in ("utils", "vqkd_teacher"):  # imported by modeling_vqkd for training and the teacher only
        stub = types.ModuleType(name)
        stub.clip, stub.get_dino_vit_base = None, None
        sys.modules.setdefault(name, stub)
    (mv,) = import_reference(args.beit2, ["modeling_vqkd"], "BEiT v2's code", "--beit2", needs_timm=False)
    torch.manual_seed(args.seed)
    enc, dec = mv.get_model_default_params(), mv.get_model_default_params()
    width, heads = SIZES[args.size]
    enc.update(img_size=224, num_classes=0, embed_dim=width, num_heads=heads)
    dec.update(
        img_size=14, patch_size=1, in_chans=32, num_classes=0, depth=3, embed_dim=width, num_heads=heads
    )
    ref = mv.VQKD(enc, dec, 8192, 32, teacher_model_type="None", quantize_kmeans_init=False).eval()
    tmp = Path(tempfile.mkdtemp())
    torch.save({"model": ref.state_dict()}, tmp / "vqkd.pth")
    convert("vqkd", tmp / "vqkd.pth", tmp / "vqkd.safetensors")
    tok = load_tokenizer(tmp / "vqkd.safetensors", device="cpu")
    ref, net = ref.to(args.dtype), tok.quantizer.build().to(args.dtype)
    imgs, boxes = views(224)
    pixels = torch.stack([to_uint8(render_view(i, b, 224)) for i, b in zip(imgs, boxes, strict=True)])
    unit = to_unit(pixels).to(args.dtype)  # ToTensor's values
    with torch.no_grad():
        theirs = ref.get_codebook_indices(unit)  # (B, 196)
        z_ref = F.normalize(
            ref.encode_task_layer(ref.encoder(ref.pre_process(unit), return_patch_tokens=True)), dim=-1
        )
        z_ours = net.features(tok.quantizer.preprocess(unit))
        ours = net(tok.quantizer.preprocess(unit))
    same = float((theirs == ours).double().mean())
    print(
        f"vqkd {args.size} ({args.dtype}): projections rel {rel(z_ours, z_ref):.2e}, codes equal {100 * same:.2f}% of {theirs.numel()}"
    )
    if args.dtype == torch.float32:  # the float32 tokenizer as `tokenize` runs it
        fp32 = tok(pixels).view(len(pixels), -1)
        print(
            f"  load_tokenizer(...)(pixels), float32: codes equal {100 * float((theirs == fp32).double().mean()):.2f}%"
        )
    return 0 if same == 1.0 and rel(z_ours, z_ref) < args.tol else 1


def dalle(args) -> int:
    (transforms,) = import_reference(
        args.beit, ["transforms"], "BEiT's transforms.py", "--beit", needs_timm=False
    )
    from dall_e import Encoder, map_pixels

    torch.manual_seed(args.seed)
    ref = Encoder().eval()  # 256 hidden, 2 blocks a group, 8192 codes: the released encoder's sizes
    tmp = Path(tempfile.mkdtemp())
    torch.save(ref, tmp / "encoder.pkl")
    convert("dalle", tmp / "encoder.pkl", tmp / "dalle.safetensors", trust_pickle=True)
    tok = load_tokenizer(tmp / "dalle.safetensors", device="cpu")
    imgs, boxes = views(112)
    crop = transforms.RandomResizedCropAndInterpolationWithTwoPic(
        224, second_size=112, interpolation="bicubic"
    )
    worst_px, same, n = 0, 0, 0
    worst_logit = 0.0
    for img, (x, y, w, h, flip) in zip(imgs, boxes, strict=True):
        src = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img  # BEiT flips, then crops
        left = img.width - x - w if flip else x
        crop.get_params = lambda *_, b=(y, left, h, w): b  # the box both sides crop
        _, second = crop(src)
        theirs_px = torch.from_numpy(np.asarray(second).copy())
        ours_px = to_uint8(render_view(img, (x, y, w, h, flip), 112, tok.interpolation))
        worst_px = max(worst_px, int((theirs_px.int() - ours_px.int()).abs().max()))
        with torch.no_grad():
            logits = ref(map_pixels(to_unit(theirs_px[None])))  # (1, 8192, 14, 14)
            ours_logits = tok.quantizer.build().blocks(tok.quantizer.preprocess(to_unit(ours_px[None])))
        worst_logit = max(worst_logit, rel(ours_logits, logits))
        codes = tok(ours_px[None])
        same += int((codes == logits.argmax(1)).sum())
        n += codes.numel()
    print(
        f"dalle: view pixels differ by at most {worst_px} grey levels, logits rel {worst_logit:.2e}, codes equal "
        f"{100 * same / n:.2f}% of {n}"
    )
    return 0 if same == n and worst_px == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="family", required=True)
    a = sub.add_parser("vqkd")
    a.add_argument("--beit2", required=True, metavar="DIR", help="unilm's beit2 folder")
    a.add_argument("--size", default="base", choices=list(SIZES))
    a.add_argument("--dtype", default="float32", choices=["float64", "float32"])
    d = sub.add_parser("dalle")
    d.add_argument("--beit", required=True, metavar="DIR", help="unilm's beit folder")
    for p in (a, d):
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.family == "vqkd":
        args.dtype = getattr(torch, args.dtype)
        args.tol = 1e-12 if args.dtype == torch.float64 else 1e-4
        return vqkd(args)
    return dalle(args)


if __name__ == "__main__":
    sys.exit(main())
