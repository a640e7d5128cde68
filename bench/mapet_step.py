"""One full training step (forward, backward, clip, AdamW) of MaPeT, BEiT and plain ViTs, same sizes.

    python bench/mapet_step.py [--sizes tiny small] [--batch 8] [--threads 2] [--device cpu|cuda] [--online]
        [--official PATH/TO/aimagelab-MaPeT --official-pythonpath TIMM_0_6_DIR]

Prints seconds per step (median of --iters after --warmup) and the ratios the project's goals are stated in:
MaPeT / official MaPeT (the official figures measured on this kind of machine: MaPeT-T 1.10 s, MaPeT-S 2.79 s
at fp32, batch 8, 2 threads), MaPeT / BEiT (goal <= 2.2), the static mask's build time / step (goal <= 1%),
and with --online the images/s of training from the token cache versus tokenizing each batch online with a
CLIP encoder (open_clip ViT-B-16, random init) plus nearest-centroid assignment. With --official the official
implementation's step (bench/official_step.py, in a subprocess with timm 0.6 on its path) runs on the same
machine, sizes, batch and precision, and the ratios against it (time, and peak memory on CUDA) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from step_timing import time_train_steps

from pretrain.beit import BEiT, block_mask, default_num_masked
from pretrain.mapet import MaPeT, random_orders, visibility_mask
from pretrain.train import Objective, param_groups
from pretrain.vit import PRESETS, VisionTransformer, ViTConfig

OFFICIAL_CPU = {"tiny": 1.10, "small": 2.79}  # s/step, fp32, batch 8, 2 threads (official aimagelab/MaPeT)
SIZES = {"tiny": "mapet_tiny", "small": "mapet_small", "base": "mapet_base", "micro": "mapet_micro"}


class PlainViT(torch.nn.Module):
    """A ViT with a K-way head on `tokens` patch tokens (or a 1000-way head on the mean when tokens=0)."""

    def __init__(self, cfg: ViTConfig, k: int, tokens: int):
        super().__init__()
        self.encoder, self.tokens = VisionTransformer(cfg), tokens
        self.head = torch.nn.Linear(cfg.dim, k if tokens else 1000)

    def loss(self, images, targets, _aux):
        x = self.encoder.forward_features(images)  # (B, N, D)
        if self.tokens:
            logits = self.head(x[:, 1 : 1 + self.tokens])  # (B, M, K)
            return F.cross_entropy(logits.flatten(0, 1), targets[:, : self.tokens].flatten()), None
        return F.cross_entropy(self.head(x[:, 1:].mean(1)), targets[:, 0] % 1000), None


def time_steps(model, make_aux, batch, device, iters, warmup, compile=False) -> tuple[float, float]:
    cfg = model.encoder.cfg
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    step = torch.compile(Objective(model)) if compile else Objective(model)  # what the trainer runs
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    targets = torch.randint(0, 8192, (batch, cfg.num_patches), generator=g).to(device)
    return time_train_steps(
        lambda aux: step(images, targets, aux.to(device))[0], model.parameters(), opt, make_aux, device, iters,
        warmup,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="time every model this many times, in turn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--online", action="store_true", help="also compare training from the cache with online CLIP"
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile every model's step (the trainer's --compile)"
    )
    ap.add_argument("--official", metavar="REPO", help="checkout of aimagelab/MaPeT: time its step too")
    ap.add_argument(
        "--official-pythonpath", default="", help="folder holding timm 0.6.x for the official code"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"device: {name}; {precision}; batch {args.batch}; median of {args.iters} steps"
        + ("; torch.compile" if args.compile else "")
    )
    for size in args.sizes:
        cfg = ViTConfig(**PRESETS[SIZES[size]])
        G, B = cfg.grid, args.batch
        torch.manual_seed(0)
        mapet = MaPeT(cfg, 8192).to(device)
        gen = torch.Generator().manual_seed(1)
        rng = np.random.default_rng(0)
        nm = default_num_masked(G * G)

        def orders(B=B, G=G, gen=gen):
            return random_orders(B, G * G, gen)

        def masks(B=B, G=G, rng=rng, nm=nm):
            return torch.from_numpy(np.stack([block_mask(rng, G, nm).reshape(-1) for _ in range(B)]))

        beit = BEiT(cfg, 8192).to(device)
        plain = PlainViT(cfg, 8192, 0).to(device)
        head = PlainViT(cfg, 8192, mapet.num_predict).to(device)
        zero = lambda: torch.zeros(1)  # noqa: E731
        rounds = []  # one row per round: every model in turn, so a drifting machine affects all alike
        for _ in range(args.rounds):
            row = {}
            for key, model, aux in (("mapet", mapet, orders), ("beit", beit, masks), ("plain", plain, zero),
                                    ("head", head, zero)):  # fmt: skip
                row[key] = time_steps(model, aux, B, device, args.iters, args.warmup, args.compile)
            if args.official:
                off = official(args, size)
                row["official"] = off["step_s"], off["peak_gib"] or float("nan")
                row["mask_build"] = off["mask_build_s"], float("nan")
            rounds.append(row)

        def med(key, i=0, rounds=rounds):
            return statistics.median(r[key][i] for r in rounds)

        def ratio(a, b, i=0, rounds=rounds):
            return statistics.median(r[a][i] / r[b][i] for r in rounds)

        t_mapet = med("mapet")
        t = time.perf_counter()
        for _ in range(10):
            visibility_mask(mapet.num_tokens, mapet.num_context)
        t_mask = (time.perf_counter() - t) / 10
        print(
            f"\n[{size}] N={mapet.num_tokens} c={mapet.num_context} P={mapet.num_predict}; {args.rounds} round(s)"
        )
        print(
            f"  MaPeT step {t_mapet:.3f} s | BEiT step {med('beit'):.3f} s | plain ViT {med('plain'):.3f} s | "
            f"ViT + 8192-way head on {mapet.num_predict} tokens {med('head'):.3f} s"
        )
        print(
            f"  MaPeT / BEiT: {ratio('mapet', 'beit'):.2f} (goal <= 2.2)   "
            f"MaPeT / ViT+head: {ratio('mapet', 'head'):.2f}"
        )
        if (
            not args.official
            and device.type == "cpu"
            and size in OFFICIAL_CPU
            and (B, args.threads) == (8, 2)
        ):
            print(
                f"  MaPeT / official MaPeT ({OFFICIAL_CPU[size]:.2f} s, issue 5's figure): "
                f"{t_mapet / OFFICIAL_CPU[size]:.2f} (goal <= 0.75)"
            )
        print(
            f"  mask built once: {1e3 * t_mask:.2f} ms = {100 * t_mask / t_mapet:.3f}% of one step (goal <= 1%)"
        )
        if device.type == "cuda":
            print(f"  peak memory: MaPeT {med('mapet', 1):.2f} GiB, BEiT {med('beit', 1):.2f} GiB")
        if args.official:
            print(
                f"  official MaPeT step {med('official'):.3f} s (its loader builds masks: {med('mask_build'):.3f} s"
                f" per batch) -> MaPeT / official: {ratio('mapet', 'official'):.2f} (goal <= "
                f"{0.5 if device.type == 'cuda' else 0.75}); per round: "
                + ", ".join(f"{r['mapet'][0] / r['official'][0]:.2f}" for r in rounds)
            )
            if device.type == "cuda":
                print(
                    f"  peak memory: official {med('official', 1):.2f} GiB -> MaPeT / official "
                    f"{ratio('mapet', 'official', 1):.2f} (goal <= 0.5)"
                )
        if args.online:
            online(cfg, mapet, B, device, args, precision, t_mapet)


def official(args, size: str) -> dict:
    """Run bench/official_step.py in a subprocess (timm 0.6 on its path) and return its JSON result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.official_pythonpath, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-W", "ignore", os.path.join(os.path.dirname(__file__), "official_step.py")]
    cmd += [
        "--repo",
        args.official,
        "--size",
        size,
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--iters", str(args.iters), "--warmup", str(args.warmup), "--device", args.device]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "official step failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def online(cfg, mapet, B, device, args, precision, t_mapet) -> None:
    """Images/s of a MaPeT step from cached targets vs the same step plus CLIP tokenization of the batch."""
    from tokenkit.clip_encoder import load_encoder, resolve_spec
    from tokenkit.kmeans import assign

    spec = resolve_spec("ViT-B-16", "none", grid=cfg.grid)
    clip = load_encoder(spec, device)
    centroids = torch.randn(8192, clip.dim, device=device)
    x = torch.randn(B, 3, spec.image_size, spec.image_size, device=device)
    ac = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )
    times = []
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        with ac:
            f = clip(x)  # (B, G*G, C)
        assign(f.flatten(0, 1).float(), centroids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    t_clip = statistics.median(times)
    print(
        f"  cached targets: {B / t_mapet:.2f} img/s; online CLIP ViT-B-16 + assignment each step: "
        f"{B / (t_mapet + t_clip):.2f} img/s; ratio cache / online {(t_mapet + t_clip) / t_mapet:.2f}x"
    )


if __name__ == "__main__":
    main()
