"""The DALL-E dVAE encoder (Ramesh et al. 2021) as BEiT uses it: argmax over 8192 logits per 8x8 cell.

BEiT (Bao et al. 2022) tokenizes a 112-px second view of each crop, so a 14 x 14 grid of ids lines up with
the 224-px student's 16-px patches; the view in [0, 1] is mapped to [0.1, 0.9] first (`map_pixels`,
logit-Laplace eps 0.1). The network: a 7x7 conv, four groups of residual blocks (each: identity or 1x1 conv,
plus 1/n_layers^2 times relu-3x3-relu-3x3-relu-3x3-relu-1x1), 2x2 max-pooling after the first three
groups, then relu and a 1x1 conv to the vocabulary. Weights keep the `dall_e` package's parameter names
(`blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`, ...). The package's convs run in float16 on
CUDA; here they run in the tokenizer's precision (float32 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


@dataclass(frozen=True)
class DalleConfig:
    image_size: int = 112  # BEiT's second view
    n_hid: int = 256
    blocks_per_group: int = 2
    k: int = 8192

    @classmethod
    def from_weights(cls, w: dict[str, torch.Tensor], image_size: int = 112) -> DalleConfig:
        n = sum(1 for k in w if k.startswith("blocks.group_1.") and k.endswith(".res_path.conv_1.w"))
        return cls(image_size, w["blocks.input.w"].shape[0], n, w["blocks.output.conv.w"].shape[0])


class Conv(nn.Module):
    """A square conv with 'same' padding, its weights named `w` and `b` as the dall_e package names them."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class Residual(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        h = n_out // 4
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential()
        for i, (a, b, kw) in enumerate(((n_in, h, 3), (h, h, 3), (h, h, 3), (h, n_out, 1)), start=1):
            self.res_path.add_module(f"relu_{i}", nn.ReLU())
            self.res_path.add_module(f"conv_{i}", Conv(a, b, kw))
        self.post_gain = 1 / n_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """(B, 3, S, S) views mapped to [0.1, 0.9] -> (B, (S/8)^2) int64 code ids (argmax of the logits)."""

    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.cfg, n = cfg, cfg.blocks_per_group
        widths = (1, 1, 2, 4, 8)  # x n_hid: the input of group 1, then each group's output
        self.blocks = nn.Sequential()
        self.blocks.add_module("input", Conv(3, cfg.n_hid, 7))
        for g in range(1, 5):
            group = nn.Sequential()
            for i in range(n):
                n_in = (widths[g - 1] if i == 0 else widths[g]) * cfg.n_hid
                group.add_module(f"block_{i + 1}", Residual(n_in, widths[g] * cfg.n_hid, 4 * n))
            if g < 4:
                group.add_module("pool", nn.MaxPool2d(2))
            self.blocks.add_module(f"group_{g}", group)
        self.blocks.add_module("output", nn.Sequential())
        self.blocks.output.add_module("relu", nn.ReLU())
        self.blocks.output.add_module("conv", Conv(8 * cfg.n_hid, cfg.k, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.blocks(x)  # (B, K, S/8, S/8)
        return logits.argmax(dim=1).flatten(1)  # (B, (S/8)^2)


def preprocess(unit: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) views in [0, 1] -> [eps, 1 - eps], as dall_e's map_pixels."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * unit + LOGIT_LAPLACE_EPS


def from_reference(state: dict[str, torch.Tensor], image_size: int = 112) -> tuple[dict, DalleConfig]:
    """The encoder's tensors out of the dall_e Encoder's state dict, and its sizes."""
    w = {k: v for k, v in state.items() if k.startswith("blocks.")}
    return w, DalleConfig.from_weights(w, image_size)
