"""The kernels behind MaPeT's masked attention calls: SDPA with a boolean mask, or FlexAttention with
BlockMasks, chosen per device and cached.

`auto` is FlexAttention on CUDA (compiled once, its BlockMasks built once per device) and SDPA with the
boolean mask elsewhere and inside a compiled training step (--compile): FlexAttention traced into the
step's graph trained away from eager on the GPU (same losses, the gradient norm 10% off after 6 steps and
1000x off after 10, in both compile modes; docs/benchmarks.md), while its eager calls match the dense
reference. An explicit "flex" is still honoured there (the trainer refuses it with --compile).
"""

from __future__ import annotations

import torch


class MaskedAttention:
    """(masks, flex) for two_stream_block: `flex` None with boolean masks (SDPA), or FlexAttention with
    BlockMasks."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._flex = None  # (device, compiled flex_attention, BlockMasks, flex_attention), built on first use

    def __call__(self, mask_b: torch.Tensor, P: int, device: torch.device) -> tuple:
        """mask_b: the (2P, c+2P) mask of the target and query rows; its last P rows are the queries'."""
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" name one device: one cache
            device = torch.device("cuda", torch.cuda.current_device())
        backend = self.backend
        if backend == "auto":
            backend = "flex" if device.type == "cuda" and not torch.compiler.is_compiling() else "sdpa"
        if backend == "sdpa":
            return (mask_b, mask_b[P:]), None
        if self._flex is None or self._flex[0] != device:
            from torch.nn.attention.flex_attention import flex_attention

            dense = mask_b.to(device)
            masks = (flex_mask(dense, device), flex_mask(dense[P:].contiguous(), device))
            self._flex = (device, torch.compile(flex_attention, dynamic=False), masks, flex_attention)
        # inside a compiled model (explicit "flex" only) the plain function: Dynamo traces it into the graph,
        # where the compiled wrapper split the graph at every attention call (CUDA graphs then gained nothing);
        # eager calls need the wrapper (uncompiled, FlexAttention materialises the scores)
        return self._flex[2], self._flex[3 if torch.compiler.is_compiling() else 1]


def flex_mask(dense: torch.Tensor, device: torch.device):
    """The FlexAttention BlockMask of a dense (rows, keys) boolean mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[q_idx, kv_idx]

    return create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=dense.shape[0], KV_LEN=dense.shape[1], device=device
    )
