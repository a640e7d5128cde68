"""One full training step (forward, backward, clip, AdamW) of MaPeT, BEiT and plain ViTs, same sizes.

    python bench/mapet_step.py [--sizes tiny small] [--batch 8] [--threads 2] [--device cpu|cuda] [--online]
        [--official PATH/TO/aimagelab-MaPeT --official-pythonpath TIMM_0_6_DIR] [--compile [MODE]]
        [--attn-backend auto|sdpa|flex] [--grad-checkpointing] [--profile STEPS]

Every iteration runs one step of every model in turn (bench/step_timing.py), so machine drift hits all
alike; prints median seconds per step and the ratios the project's goals are stated in, as medians of the
per-iteration ratios: MaPeT / BEiT (goal <= 2.2), MaPeT / official MaPeT (goal <= 0.75 on CPU, <= 0.5 on a
GPU), the static mask's build time / step (goal <= 1%). Next to each time ratio it prints the ratio of the
FLOPs the two steps do (counted by torch's FlopCounterMode): how far a ratio is from its compute floor.
On CUDA it prints each model's peak memory (its parameters and optimizer state plus the step's transient
memory; goal MaPeT / official <= 0.5).

With --official the official implementation (bench/official_step.py: its model, its loader's per-sample
masks built untimed, its engine's step) runs in this process beside ours, with timm 0.6 from
--official-pythonpath; without it, the CPU ratio is against the issue's figures for the official code
(MaPeT-T 1.10 s, MaPeT-S 2.79 s at fp32, batch 8, 2 threads, on a faster machine than this project's).
With --online: images/s of training from the token cache versus tokenizing each batch online with a CLIP
encoder (open_clip ViT-B-16, random init) plus nearest-centroid assignment.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from step_timing import TrainStep, interleave, ratio, step_flops

from pretrain.beit import BEiT, block_mask, default_num_masked
from pretrain.data import random_orders
from pretrain.mapet import MaPeT, default_context, visibility_mask
from pretrain.optim import adamw, param_groups
from pretrain.train import Objective, compiled
from pretrain.vit import PRESETS, VisionTransformer, ViTConfig

OFFICIAL_CPU = {"tiny": 1.10, "small": 2.79}  # s/step, fp32, batch 8, 2 threads (official aimagelab/MaPeT)
SIZES = {"tiny": "mapet_tiny", "small": "mapet_small", "base": "mapet_base", "micro": "mapet_micro"}


class PlainViT(torch.nn.Module):
    """A ViT with a K-way head on `tokens` patch tokens (or a 1000-way head on the mean when tokens=0)."""

    def __init__(self, cfg: ViTConfig, k: int, tokens: int):
        super().__init__()
        self.encoder, self.tokens = VisionTransformer(cfg), tokens
        self.head = torch.nn.Linear(cfg.dim, k if tokens else 1000)

    def loss(self, images, targets, _aux, drop):
        x = self.encoder.forward_features(images, drop)  # (B, N, D)
        if self.tokens:
            logits = self.head(x[:, 1 : 1 + self.tokens])  # (B, M, K)
            return F.cross_entropy(logits.flatten(0, 1), targets[:, : self.tokens].flatten()), None
        return F.cross_entropy(self.head(x[:, 1:].mean(1)), targets[:, 0] % 1000), None


def train_step(model, make_aux, batch: int, device: torch.device, compile: str = "") -> TrainStep:
    """The trainer's step (pretrain.train.Objective, its AdamW groups) on a fixed random batch; make_aux()
    gives the per-step randomness the data loader would (orders or masks, and drop-path uniforms). compile:
    "" (eager) or a torch.compile mode ("default", "reduce-overhead": CUDA graphs)."""
    cfg = model.encoder.cfg
    opt = adamw(param_groups(model, 0.05), lr=1e-4)
    step = compiled(Objective(model), device, compile) if compile else Objective(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    targets = torch.randint(0, 8192, (batch, cfg.num_patches), generator=g).to(device)

    def step_loss(draws):
        if compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs' previous outputs are dead
        aux, drop = draws
        return step(images, targets, aux.to(device), drop.to(device))[0]

    return TrainStep(step_loss, list(model.parameters()), opt, make_aux, device)


def our_steps(
    cfg: ViTConfig,
    batch: int,
    device: torch.device,
    compile: str = "",
    names: tuple[str, ...] = ("mapet", "beit", "plain", "head"),
    attn_backend: str = "auto",
    grad_checkpointing: bool = False,
) -> dict[str, TrainStep]:
    """TrainSteps of MaPeT, BEiT, a plain ViT and a ViT with MaPeT's head (those in `names`); grad_checkpointing
    for all of them (the trainer's --grad-checkpointing)."""
    G = cfg.grid
    torch.manual_seed(0)
    P = 1 + G * G - default_context(G * G)
    gen, rng, nm = torch.Generator().manual_seed(1), np.random.default_rng(0), default_num_masked(G * G)

    def drop():  # (B, depth, 2) drop-path uniforms, as pretrain.data.SampleDraws gives them
        return torch.rand(batch, cfg.depth, 2, generator=gen)

    def orders():
        return random_orders(batch, G * G, gen), drop()

    def masks():
        return torch.from_numpy(np.stack([block_mask(rng, G, nm).reshape(-1) for _ in range(batch)])), drop()

    zero = lambda: (torch.zeros(1), drop())  # noqa: E731
    models = {
        "mapet": (lambda: MaPeT(cfg, 8192, attn_backend=attn_backend), orders),
        "beit": (lambda: BEiT(cfg, 8192), masks),
        "plain": (lambda: PlainViT(cfg, 8192, 0), zero),
        "head": (lambda: PlainViT(cfg, 8192, P), zero),
    }
    steps = {}
    for k in names:
        net = models[k][0]().to(device)
        net.encoder.grad_checkpointing = grad_checkpointing
        steps[k] = train_step(net, models[k][1], batch, device, compile)
    return steps


def official_step(args, size: str, batch: int, device: torch.device) -> tuple[TrainStep, list[float]]:
    """The official step (bench/official_step.py) in this process, and the list its loader's mask build
    times go to (the build is the data loader's work: untimed in the step)."""
    if args.official_pythonpath and args.official_pythonpath not in sys.path:
        sys.path.insert(0, args.official_pythonpath)  # timm 0.6 for the official models
    from official_step import Official

    off, builds = Official(args.official, size, batch, device), []

    def make_batch():
        t = time.perf_counter()
        b = off.loader_batch()
        builds.append(time.perf_counter() - t)
        return b

    return TrainStep(off.step_loss, list(off.model.parameters()), off.optimizer(), make_batch, device), builds


def flops_per_sample(args, cfg: ViTConfig, size: str) -> dict[str, float]:
    """FLOPs of one forward + backward per sample (bench/step_timing.step_flops), counted at batch 1 on the
    CPU: MaPeT, BEiT, and the official step with --official."""
    cpu = torch.device("cpu")
    steps = our_steps(cfg, 1, cpu, names=("mapet", "beit"))
    out = {k: step_flops(steps[k].step_loss, steps[k].make_batch()) for k in ("mapet", "beit")}
    if args.official:
        off, _ = official_step(args, size, 1, cpu)
        out["official"] = step_flops(off.step_loss, off.make_batch())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations (each: one step of every model)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--online", action="store_true", help="also compare training from the cache with online CLIP"
    )
    ap.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="",
        choices=["default", "reduce-overhead"],
        help="torch.compile MaPeT's and BEiT's steps in this mode, as the trainer's --compile [MODE] does "
        "(reduce-overhead: CUDA graphs); the plain ViTs are left out",
    )
    ap.add_argument(
        "--attn-backend",
        default="auto",
        choices=["auto", "sdpa", "flex"],
        help="MaPeT's attention (the trainer's --attn-backend; auto: flex on CUDA, sdpa elsewhere and inside "
        "a compiled step; flex with --compile: traced FlexAttention, which the trainer refuses)",
    )
    ap.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute each block in backward, in all our models (the trainer's --grad-checkpointing)",
    )
    ap.add_argument(
        "--profile", type=int, default=0, metavar="STEPS", help="profile MaPeT's step over STEPS more steps"
    )
    ap.add_argument("--official", metavar="REPO", help="checkout of aimagelab/MaPeT: time its step too")
    ap.add_argument(
        "--official-pythonpath", default="", help="folder holding timm 0.6.x for the official code"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(
        f"device: {name}; {precision}; batch {args.batch}; {args.iters} iterations after {args.warmup} warm-up, "
        "each one step of every model in turn"
        + (f"; torch.compile {args.compile} (ours)" if args.compile else "")
        + f"; MaPeT attention {args.attn_backend}"
        + (" (sdpa inside the compiled step)" if args.compile and args.attn_backend == "auto" else "")
        + ("; gradient checkpointing (ours)" if args.grad_checkpointing else "")
    )
    for size in args.sizes:
        cfg = ViTConfig(**PRESETS[SIZES[size]])
        B = args.batch
        # compiling takes minutes per model on a GPU: with --compile only the two objectives are built
        names = ("mapet", "beit") if args.compile else ("mapet", "beit", "plain", "head")
        steps = our_steps(cfg, B, device, args.compile, names, args.attn_backend, args.grad_checkpointing)
        if args.official:
            steps["official"], builds = official_step(args, size, B, device)
        interleave(steps, args.iters, args.warmup)
        flops = {k: v * B for k, v in flops_per_sample(args, cfg, size).items()}
        mapet = steps["mapet"]
        t_mapet = mapet.median
        c, P = default_context(cfg.num_patches), 1 + cfg.num_patches - default_context(cfg.num_patches)
        t = time.perf_counter()
        for _ in range(10):
            visibility_mask(c, P)
        t_mask = (time.perf_counter() - t) / 10

        def gf(k, flops=flops, steps=steps):
            return f"{flops[k] / 1e9:.1f} GFLOP ({flops[k] / steps[k].median / 1e9:.0f} GFLOP/s)"

        print(f"\n[{size}] N={1 + cfg.num_patches} c={c} P={P}")
        plain = (
            f" | plain ViT {steps['plain'].median:.3f} s | ViT + 8192-way head on {P} tokens "
            f"{steps['head'].median:.3f} s"
            if "plain" in steps
            else ""
        )
        print(f"  step: MaPeT {t_mapet:.3f} s | BEiT {steps['beit'].median:.3f} s{plain}")
        if args.compile:
            print(f"  compile (both objectives, this size and before): {compile_counts()}")
        print(f"  forward + backward: MaPeT {gf('mapet')} | BEiT {gf('beit')}")
        head = f"   MaPeT / ViT+head: {ratio(steps, 'mapet', 'head'):.2f}" if "head" in steps else ""
        print(
            f"  MaPeT / BEiT: {ratio(steps, 'mapet', 'beit'):.2f} (goal <= 2.2; FLOPs "
            f"{flops['mapet'] / flops['beit']:.2f}){head}"
        )
        if not args.official and not cuda and size in OFFICIAL_CPU and (B, args.threads) == (8, 2):
            print(
                f"  MaPeT / official MaPeT ({OFFICIAL_CPU[size]:.2f} s, issue 5's figure): "
                f"{t_mapet / OFFICIAL_CPU[size]:.2f} (goal <= 0.75)"
            )
        print(
            f"  mask built once: {1e3 * t_mask:.2f} ms = {100 * t_mask / t_mapet:.3f}% of one step (goal <= 1%)"
        )
        if args.official:
            r = [a / b for a, b in zip(mapet.times, steps["official"].times, strict=True)]
            q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], r[0], r[0])
            print(
                f"  official: step {steps['official'].median:.3f} s, {gf('official')}; its loader builds masks "
                f"in {statistics.median(builds):.3f} s per batch\n  MaPeT / official: "
                f"{statistics.median(r):.2f} (goal <= {0.5 if cuda else 0.75}; quartiles {q1:.2f}-{q3:.2f}; "
                f"FLOPs {flops['mapet'] / flops['official']:.2f})"
            )
        if cuda:
            peak = {k: s.peak_bytes / 2**30 for k, s in steps.items()}
            line = f"  peak GiB (parameters, optimizer state, step): MaPeT {peak['mapet']:.2f}, BEiT {peak['beit']:.2f}"
            if args.compile == "reduce-overhead":  # live memory while recording; the pool stays reserved
                line += " (ours: while the CUDA graphs were recorded)"
            if args.official:
                line += (
                    f", official {peak['official']:.2f} -> MaPeT / official "
                    f"{peak['mapet'] / peak['official']:.2f} (goal <= 0.5)"
                )
            print(line)
        if args.online:
            online(cfg, B, device, args, precision, t_mapet)
        if args.profile:
            profile(mapet, args.profile, cuda)
        del steps


def compile_counts() -> str:
    """What torch.compile did so far in this process: graphs compiled, graph breaks, and the graphs that
    reduce-overhead left out of CUDA graphs (each skip's reason is logged as a warning when it happens)."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    skips = counters["inductor"]["cudagraph_skips"]
    return f"{counters['stats']['unique_graphs']} graphs, {breaks} graph breaks, {skips} CUDA-graph skips"


def profile(step: TrainStep, iters: int, cuda: bool) -> None:
    """The operators (and on CUDA the kernels) that take MaPeT's step time, over `iters` more steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(iters):
            step(record=False)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"  MaPeT step profile, {iters} steps, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


def online(cfg, B, device, args, precision, t_mapet) -> None:
    """Images/s of a MaPeT step from cached targets vs the same step plus CLIP tokenization of the batch."""
    from tokenkit.codebook import Codebook
    from tokenkit.encoders import load_encoder, resolve_spec
    from tokenkit.tokenizer import CodebookTokenizer

    spec = resolve_spec("ViT-B-16", "none", grid=cfg.grid)
    clip = load_encoder(spec, device)
    centroids = np.random.default_rng(0).standard_normal((8192, clip.dim), dtype=np.float32)
    tok = CodebookTokenizer(
        Codebook(centroids, spec, {"kmeans": {"metric": "l2"}}), device, precision, encoder=clip
    )
    S = spec.image_size
    pixels = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8)  # the views, as loaders ship them
    pixels = pixels.to(device)
    times = []
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        tok(pixels)  # (B, G, G) token ids
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
