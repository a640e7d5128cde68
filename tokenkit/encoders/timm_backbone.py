"""Grid features from a timm ViT backbone (DINOv2, EVA-02, SigLIP, DeiT, BEiT, ...). The only module that
imports timm.

`--model timm:NAME[.TAG]`: the patch tokens after block `layer` (default the last), before the final norm,
prefix tokens (class, registers) dropped, through timm's own `forward_intermediates`. The input size is the
grid times the model's patch size (14 for DINOv2: grid 16 is 224 px); timm resamples the position
embeddings of loaded weights to it. Weights: `hub` (timm downloads the tag's weights, as
`timm.create_model(NAME, pretrained=True)`), a local checkpoint file, or `none` (seeded random init).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tokenkit.encoders.spec import EncoderSpec, file_sha256
from tokenkit.errors import ConfigError, load_failure, require

PREFIX = "timm:"


def _timm():
    import timm

    return timm


def _weights_id(name: str, pretrained: str, tag: str, seed: int) -> str:
    if pretrained == "none":
        return f"none:seed={seed}"
    if pretrained == "hub":
        return f"timm:{name.split('.')[0]}.{tag}" if tag else f"timm:{name}"
    if os.path.isfile(pretrained):
        return file_sha256(pretrained)
    raise ConfigError(
        f"--pretrained {pretrained}: not a file; pass 'hub' (timm downloads the weights), a local checkpoint "
        "or 'none'"
    )


def _build(name: str, image_size: int | None, **kw) -> nn.Module:
    timm = _timm()
    args = {"num_classes": 0, **kw}
    if image_size is not None:
        args["img_size"] = image_size
    return timm.create_model(name, **args)


def resolve(
    model: str, pretrained: str, grid: int, image_size: int | None, layer: int, seed: int
) -> EncoderSpec:
    """Check the model name and layer, derive the input size from the grid, fingerprint the weights."""
    name = model.removeprefix(PREFIX)
    require(
        (
            ("--grid", grid, grid >= 1, ">= 1"),
            ("--image-size", image_size, image_size is None or image_size >= 1, ">= 1 (or left out)"),
        )
    )
    if not _timm().is_model(name):
        raise ConfigError(f"--model {model}: unknown timm model; see timm.list_models()")
    with torch.device("meta"):  # the shape of the model only: no memory, no init
        probe = _build(name, None)
    if not hasattr(probe, "patch_embed") or not hasattr(probe, "forward_intermediates"):
        raise ConfigError(
            f"--model {model}: not a ViT-style timm model (no patch_embed); pass a ViT backbone"
        )
    stride = int(probe.patch_embed.patch_size[0])
    size = grid * stride
    if image_size is not None and image_size != size:
        raise ConfigError(
            f"--image-size {image_size} with --grid {grid}: {name} has patch size {stride}, so the grid needs "
            f"--image-size {size} (or {image_size // stride * stride} for --grid {image_size // stride})"
        )
    n = len(probe.blocks)
    if not -n <= layer < n:
        raise ConfigError(f"--layer {layer}: {name} has {n} blocks; pass a block index in [-{n}, {n - 1}]")
    cfg = probe.pretrained_cfg
    return EncoderSpec(
        "timm",
        model,
        pretrained,
        _weights_id(name, pretrained, cfg.get("tag") or "", seed),
        type(probe).__name__,
        layer % n,
        size,
        grid,
        tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        seed,
    )


class TimmGrid(nn.Module):
    """(B, 3, S, S) normalised images -> (B, G*G, C) float32 patch tokens of block `spec.layer`."""

    def __init__(self, model: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.dim = int(model.num_features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (f,) = self.model.forward_intermediates(
            x, indices=[self.spec.layer], norm=False, output_fmt="NLC", intermediates_only=True
        )  # (B, G*G, C), prefix tokens dropped
        assert f.shape[1] == self.spec.grid**2, f"grid {f.shape[1]} != {self.spec.grid}^2"
        return f.float()


def load(spec: EncoderSpec, device: str | torch.device = "cpu") -> TimmGrid:
    """Build the backbone of `spec` with its weights, in eval mode, pruned after block `spec.layer`."""
    name = spec.model.removeprefix(PREFIX)
    if spec.pretrained == "none":
        torch.manual_seed(spec.seed)  # random init is the test / demo encoder: make it reproducible
        model = _build(name, spec.image_size)
    else:
        if (
            spec.pretrained != "hub"
            and (got := _weights_id(name, spec.pretrained, "", spec.seed)) != spec.weights_id
        ):
            raise ConfigError(
                f"{spec.pretrained}: weights {got} differ from the recorded {spec.weights_id}; pass the "
                "checkpoint the codebook was built with"
            )
        overlay = {} if spec.pretrained == "hub" else {"pretrained_cfg_overlay": {"file": spec.pretrained}}
        try:
            model = _build(name, spec.image_size, pretrained=True, **overlay)
        except (RuntimeError, OSError, ValueError, KeyError) as e:  # network, file, key layout
            raise ConfigError(
                f"--pretrained {spec.pretrained}: could not load {name} weights ({load_failure(e)}); pass a "
                "local checkpoint or 'none'"
            ) from e
    model.prune_intermediate_layers(indices=[spec.layer], prune_norm=True, prune_head=True)
    return TimmGrid(model.eval().requires_grad_(False).to(device), spec)
