"""Code models converted once into one safetensors file: VQ-KD (BEiT v2) and the DALL-E dVAE (BEiT).

A code model yields token ids itself, where a codebook needs a feature extractor and k-means. `tokenkit
convert FAMILY SRC OUT` reads the public checkpoint, keeps the tensors that tokenizing needs (under the
reference's own key names) and writes them with the metadata key `tokenkit`: format_version, kind
"quantizer", family, config (the sizes), k, image_size, grid, the sha256 of the tensors, and the source
file's name and sha256. Nothing executes on load. The VQ-KD checkpoint is a plain state dict, read with
`torch.load(weights_only=True)`; DALL-E's `encoder.pkl` is a pickled module, which only `--trust-pickle`
unpickles (it runs code from the file: pass it only for a file from a source you trust).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from tokenkit.codebook import check_writable, read_header
from tokenkit.encoders import dalle, vqkd
from tokenkit.encoders.spec import file_sha256
from tokenkit.errors import CodebookError, ConfigError, load_failure
from tokenkit.journal import FORMAT_VERSION, atomic_write_bytes

# family -> (module, config class, the view's interpolation in the reference pipeline)
FAMILIES = {"vqkd": (vqkd, vqkd.VQKDConfig, "bicubic"), "dalle": (dalle, dalle.DalleConfig, "lanczos")}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and little-endian bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        a = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


@dataclass
class Quantizer:
    family: str  # "vqkd" | "dalle"
    config: dict  # the family's config dataclass as a dict
    weights: dict[str, torch.Tensor]
    source: dict  # {"file": name, "sha256": "sha256:<hex>"} of the checkpoint it was converted from

    @property
    def module(self):
        return FAMILIES[self.family][0]

    @property
    def cfg(self):
        return FAMILIES[self.family][1](**self.config)

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def grid(self) -> int:
        return self.image_size // (self.cfg.patch_size if self.family == "vqkd" else 8)

    @property
    def interpolation(self) -> str:
        return FAMILIES[self.family][2]

    @property
    def sha256(self) -> str:
        return tensors_sha256(self.weights)

    def identity(self) -> dict:
        """Everything that changes a token: family, sizes, input size, view interpolation, weights."""
        return {
            "kind": "quantizer",
            "family": self.family,
            "config": self.config,
            "interpolation": self.interpolation,
            "weights_sha256": self.sha256,
        }

    def header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "quantizer",
            "family": self.family,
            "config": self.config,
            "k": self.k,
            "image_size": self.image_size,
            "grid": self.grid,
            "sha256": self.sha256,
            "source": self.source,
        }

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The code model with these weights: (B, 3, S, S) pre-processed views -> (B, G*G) ids."""
        net = (vqkd.VQKD if self.family == "vqkd" else dalle.DalleEncoder)(self.cfg)
        net.load_state_dict(self.weights, strict=True)
        return net.eval().requires_grad_(False).to(device)

    def preprocess(self, unit: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) views in [0, 1] -> the model's input scale."""
        return self.module.preprocess(unit)

    def save(self, path: Path) -> None:
        data = save(
            {k: v.contiguous() for k, v in self.weights.items()},
            metadata={"tokenkit": json.dumps(self.header(), sort_keys=True)},
        )
        atomic_write_bytes(Path(path), data)

    @classmethod
    def load(cls, path: Path) -> Quantizer:
        path = Path(path)
        header = read_header(path)
        if header.get("kind") != "quantizer" or header.get("family") not in FAMILIES:
            raise CodebookError(f"{path}: not a tokenkit quantizer file; convert one with 'tokenkit convert'")
        weights = load_file(str(path))
        q = cls(header["family"], header["config"], weights, header["source"])
        if q.sha256 != header["sha256"]:
            raise CodebookError(
                f"{path}: weights sha256 does not match its header; the file is damaged, convert again"
            )
        return q


def _state_dict(obj, src: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a state dict, one under 'model' / 'state_dict', or a module's."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{src}: holds no state dict of tensors; pass the released checkpoint")
    return obj


def _load_checkpoint(src: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict in `src`: weights-only loading, or with `trust_pickle` unpickling a pickled object."""
    unreadable = f"{src}: not a readable checkpoint ({{}}); pass the released file"
    try:
        return _state_dict(torch.load(src, map_location="cpu", weights_only=True), src)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # no pickled object: junk or a damaged file
            raise ConfigError(unreadable.format(load_failure(e))) from e
        if not trust_pickle:
            raise ConfigError(
                f"{src}: a pickled object, not a plain state dict (DALL-E's encoder.pkl is one); loading it runs "
                "code from the file: pass --trust-pickle if you trust its source"
            ) from e
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any bytes may arrive here; torch's unpickler raises many kinds
        raise ConfigError(unreadable.format(load_failure(e))) from e
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"{src}: unpickling needs the module '{e.name}' (for encoder.pkl: pip install DALL-E)"
        ) from e
    except Exception as e:  # noqa: BLE001 - a trusted pickle can still be damaged
        raise ConfigError(unreadable.format(load_failure(e))) from e
    return _state_dict(obj, src)


def convert(
    family: str, src: Path, out: Path, trust_pickle: bool = False, image_size: int | None = None
) -> Quantizer:
    """Convert the public checkpoint `src` of `family` into the quantizer file `out`."""
    if family not in FAMILIES:
        raise ConfigError(f"convert {family}: choose one of {', '.join(FAMILIES)}")
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise ConfigError(f"{src}: checkpoint not found")
    check_writable(out)
    state = _load_checkpoint(src, trust_pickle)
    module, cfg_cls, _ = FAMILIES[family]
    needed = "encoder.patch_embed.proj.weight" if family == "vqkd" else "blocks.input.w"
    if needed not in state:
        raise ConfigError(
            f"{src}: no '{needed}' among its {len(state)} tensors; not a {family} checkpoint in the reference's key "
            "layout"
        )
    try:
        weights, cfg = module.from_reference(state)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{src}: incomplete {family} checkpoint ({load_failure(e)})") from e
    if image_size is not None and image_size != cfg.image_size:
        if family == "vqkd":  # its position embeddings fix the input size
            raise ConfigError(
                f"--image-size {image_size}: this VQ-KD takes {cfg.image_size} px; drop --image-size"
            )
        cfg = cfg_cls(**{**asdict(cfg), "image_size": image_size})
    q = Quantizer(family, asdict(cfg), {k: v.float().contiguous() for k, v in weights.items()}, {})
    q.source = {"file": src.name, "sha256": file_sha256(src)}
    try:
        q.build()  # every tensor present and of the shape the config implies
    except RuntimeError as e:
        raise ConfigError(f"{src}: tensors do not form a {family} model ({load_failure(e)})") from e
    q.save(out)
    return q
