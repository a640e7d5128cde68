"""Shared by the scripts that run other projects' code beside ours (bench/official_step.py,
bench/official_parity.py, bench/beit_parity.py, bench/kclip_parity.py): importing that code from a folder the
user names, the parity scripts' common flags, copying weights between the two models, and the difference
measure they report. This project ships none of that code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch


def import_reference(folder: str, modules: list[str], what: str, flag: str, needs_timm: bool = True) -> list:
    """The named modules from `folder` (put first on sys.path), or exit with one line naming the folder and
    the fix (`flag`: the command-line flag that names the folder; `needs_timm`: the code imports timm 0.6,
    found through FLAG-pythonpath)."""
    sys.path.insert(0, folder)
    try:
        return [importlib.import_module(m) for m in modules]
    except Exception as e:  # noqa: BLE001 - any import failure means the same fix
        timm = f", and {flag}-pythonpath at a folder holding timm 0.6.x" if needs_timm else ""
        raise SystemExit(
            f"error: cannot import {what} from {folder} ({type(e).__name__}: {e}); point {flag} at that code{timm}"
        ) from None


def parity_args(ap: argparse.ArgumentParser, code_flag: str, code_help: str) -> argparse.Namespace:
    """Add the flags every parity script takes, parse, and put the timm 0.6 folder on sys.path."""
    ap.add_argument(code_flag, required=True, metavar="DIR", help=code_help)
    ap.add_argument(f"{code_flag}-pythonpath", default="", help="folder holding timm 0.6.x for that code")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    timm_dir = getattr(args, f"{code_flag.lstrip('-').replace('-', '_')}_pythonpath")
    if timm_dir:
        sys.path.insert(0, timm_dir)
    args.dtype = getattr(torch, args.dtype)
    args.tol = 1e-9 if args.dtype == torch.float64 else 1e-4
    return args


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of a from the reference b, relative to b's largest magnitude."""
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))


ALL = slice(None)
Plan = list[tuple[str, slice, str, slice]]  # (their parameter, its rows, our parameter, its rows)


def copy_weights(theirs: torch.nn.Module, ours: torch.nn.Module, plan: Plan) -> None:
    """Copy their parameters into ours as `plan` says; exit naming any parameter of either model that the
    plan leaves out."""
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    left = sorted(set(their_params) - {p[0] for p in plan}) + sorted(set(our_params) - {p[2] for p in plan})
    if left:
        raise SystemExit(f"error: parameters without a counterpart: {', '.join(left)}")
    with torch.no_grad():
        for a, ra, b, rb in plan:
            our_params[b][rb].copy_(their_params[a][ra])


def grad_diffs(theirs: torch.nn.Module, ours: torch.nn.Module, plan: Plan) -> dict[str, float]:
    """rel() of each of our gradients (the rows `plan` maps) against theirs, keyed by our parameter."""
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    return {
        b if rb == ALL else f"{b}[{rb.start}:{rb.stop}]": rel(
            our_params[b].grad[rb], their_params[a].grad[ra]
        )
        for a, ra, b, rb in plan
    }
