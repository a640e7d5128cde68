"""CLIP grid features from any open_clip vision tower. The only module that imports open_clip.

ResNet trunks (ModifiedResNet): the output of the last stage, before attention pooling, as the
official k-CLIP does with RN50x64 at 448 px (14x14 x 4096). ViTs: the patch tokens after block `layer`
(default the last), before ln_post, class token dropped. The input size is derived from the grid:
stride 32 for ResNets, the patch size for ViTs.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from tokenkit.encoders.spec import EncoderSpec, file_sha256
from tokenkit.errors import ConfigError, load_failure, require

MODEL_CONFIGS = Path(__file__).parents[1] / "model_configs"  # tiny configs for tests and CPU demos


def _open_clip():
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)
    return open_clip


# the checkpoint names open_clip looks for in a `local-dir:` folder, in its order
LOCAL_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def _weights_id(pretrained: str, seed: int) -> str:
    """What identifies the weights: the tag, the sha256 of the checkpoint file, or the random-init seed."""
    if pretrained == "none":
        return f"none:seed={seed}"
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained.removeprefix("local-dir:"))
        found = [folder / n for n in LOCAL_DIR_WEIGHTS if (folder / n).is_file()]
        if not found:
            raise ConfigError(
                f"{folder}: no {' / '.join(LOCAL_DIR_WEIGHTS)} in this folder; pass an open_clip "
                "model folder (open_clip_config.json + weights)"
            )
        return file_sha256(found[0])
    if os.path.isfile(pretrained):
        return file_sha256(Path(pretrained))
    if pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ConfigError(
            f"{pretrained}: checkpoint not found; pass an existing file, an open_clip tag or 'none'"
        )
    return pretrained


def _model_config(oc, model: str, pretrained: str) -> dict:
    """The model's open_clip config: from the `local-dir:` folder when weights come from one, else by name."""
    if pretrained.startswith("local-dir:"):
        path = Path(pretrained.removeprefix("local-dir:")) / "open_clip_config.json"
        try:
            local = json.loads(path.read_text())
            return {**local["model_cfg"], "preprocess_cfg": local.get("preprocess_cfg", {})}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"{path}: not a readable open_clip config with 'model_cfg' ({e}); fix the folder"
            ) from e
    cfg = oc.get_model_config(model)
    if cfg is None:
        raise ConfigError(f"--model {model}: unknown open_clip model; see open_clip.list_models()")
    return cfg


def resolve(
    model: str,
    pretrained: str = "none",
    grid: int = 14,
    image_size: int | None = None,
    layer: int = -1,
    seed: int = 0,
) -> EncoderSpec:
    """Check the model name, derive the input size from the grid, and fingerprint the weights."""
    oc = _open_clip()
    require(
        (
            ("--grid", grid, grid >= 1, ">= 1"),
            ("--image-size", image_size, image_size is None or image_size >= 1, ">= 1 (or left out)"),
        )
    )
    cfg = _model_config(oc, model, pretrained)
    vcfg = cfg["vision_cfg"]
    if "timm_model_name" in vcfg and vcfg["timm_model_name"]:
        raise ConfigError(f"--model {model}: timm vision towers are not supported; use a ResNet or ViT CLIP")
    arch = "resnet" if isinstance(vcfg.get("layers"), (list, tuple)) else "vit"
    stride = 32 if arch == "resnet" else int(vcfg["patch_size"])
    size = grid * stride
    if image_size is not None and image_size != size:
        raise ConfigError(
            f"--image-size {image_size} with --grid {grid}: {model} has stride {stride}, so the grid needs "
            f"--image-size {size} (or {image_size // stride * stride} for --grid {image_size // stride})"
        )
    if arch == "resnet" and layer != -1:
        raise ConfigError(
            f"--layer {layer}: ResNet towers give features from the last stage only; drop --layer"
        )
    if arch == "vit":
        n = int(vcfg["layers"])
        if not -n <= layer < n:
            raise ConfigError(
                f"--layer {layer}: {model} has {n} blocks; pass a block index in [-{n}, {n - 1}]"
            )
        layer = layer % n
    pp = cfg.get("preprocess_cfg", {})
    mean = tuple(pp.get("mean", oc.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", oc.OPENAI_DATASET_STD))
    return EncoderSpec(
        "clip", model, pretrained, _weights_id(pretrained, seed), arch, layer, size, grid, mean, std, seed
    )


class ClipGrid(nn.Module):
    """(B, 3, S, S) normalised images -> (B, G*G, C) float32 patch features, row-major over the grid."""

    def __init__(self, visual: nn.Module, spec: EncoderSpec, dim: int):
        super().__init__()
        self.visual, self.spec, self.dim = visual, spec, dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.spec.grid
        if self.spec.arch == "resnet":
            out = self.visual.forward_intermediates(x, indices=[4], stop_early=True, intermediates_only=True)
            f = out["image_intermediates"][0]  # (B, C, G, G)
            f = f.flatten(2).transpose(1, 2)  # (B, G*G, C)
        else:
            out = self.visual.forward_intermediates(
                x, indices=[self.spec.layer], stop_early=True, intermediates_only=True, output_fmt="NLC"
            )
            f = out["image_intermediates"][0]  # (B, G*G, C)
        assert f.shape[1] == G * G, f"grid {f.shape[1]} != {G}x{G}"
        return f.float()


def load(spec: EncoderSpec, device: str | torch.device = "cpu") -> ClipGrid:
    """Build the vision tower of `spec` with its weights (tag, file, or seeded random init), in eval mode."""
    oc = _open_clip()
    kwargs = {}
    if spec.arch == "vit":
        kwargs["force_image_size"] = (
            spec.image_size
        )  # open_clip resizes position embeddings of loaded weights
    if spec.pretrained == "none":
        torch.manual_seed(spec.seed)  # random init is the test / demo encoder: make it reproducible
        model = oc.create_model(spec.model, pretrained=None, **kwargs)
    else:
        weights = spec.pretrained
        got = _weights_id(spec.pretrained, spec.seed)
        if got != spec.weights_id:
            raise ConfigError(
                f"{spec.pretrained}: weights {got} differ from the recorded {spec.weights_id}; "
                "pass the checkpoint the codebook was built with"
            )
        try:
            if weights.startswith("local-dir:"):
                model = oc.create_model(weights, **kwargs)
            else:
                model = oc.create_model(spec.model, pretrained=weights, **kwargs)
        except (
            RuntimeError,
            OSError,
            ValueError,
            KeyError,
            EOFError,
            pickle.UnpicklingError,
        ) as e:  # tag, network, file
            raise ConfigError(
                f"--pretrained {weights}: could not load {spec.model} weights ({load_failure(e)}); "
                "pass a local checkpoint (--pretrained PATH or local-dir:PATH) or 'none'"
            ) from e
    visual = model.visual
    if spec.arch == "vit":
        visual.prune_intermediate_layers(indices=[spec.layer], prune_norm=True, prune_head=True)
    visual.eval().requires_grad_(False).to(device)
    with torch.no_grad():
        probe = torch.zeros(1, 3, spec.image_size, spec.image_size, device=device)
        enc = ClipGrid(visual, spec, dim=0)
        dim = enc(probe).shape[-1]
    return ClipGrid(visual, spec, dim)
