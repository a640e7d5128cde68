"""token_loss: the blocked head + cross-entropy gives F.cross_entropy's loss and gradients, keeps no logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.beit import BEiT
from pretrain.data import random_orders
from pretrain.mapet import MaPeT
from pretrain.token_loss import IGNORE, token_loss
from pretrain.vit import ViTConfig


def unfused(x, head, y):
    """The plain head and cross-entropy (softmax in float32 at least, as under autocast)."""
    logits = head(x)
    flat = logits.flatten(0, -2)
    loss = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), y.flatten())
    return loss, (logits.argmax(-1) == y).float().mean()


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_equals_cross_entropy_of_the_head_in_fp64(rows):
    torch.manual_seed(0)
    head = nn.Linear(12, 50).double()
    x = torch.randn(3, 21, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 21))
    y[0, :5] = head(x).argmax(-1)[0, :5]  # some correct predictions, so top-1 is not trivially 0
    wrt = [x, head.weight, head.bias]
    want, want_acc = unfused(x, head, y)
    gw = torch.autograd.grad(3 * want, wrt)
    got, acc = token_loss(x, head, y, rows=rows)
    gg = torch.autograd.grad(3 * got, wrt)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert acc.item() == want_acc.item() >= 5 / 63
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_ignored_rows_take_no_part_in_loss_gradients_or_accuracy(rows):
    torch.manual_seed(4)
    head = nn.Linear(10, 30).double()
    x = torch.randn(4, 9, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (4, 9))
    y[:, :3] = head(x).argmax(-1)[:, :3]  # 12 correct predictions
    y[1, 1:7] = IGNORE  # 2 of the correct ones and 4 others ignored
    y[3, 8] = IGNORE
    keep = y != IGNORE
    wrt = [x, head.weight, head.bias]
    want = F.cross_entropy(head(x[keep]), y[keep])
    gw = torch.autograd.grad(want, wrt)
    got, acc = token_loss(x, head, y, rows=rows)
    gg = torch.autograd.grad(got, wrt)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert acc.item() == pytest.approx(10 / 29)
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-16)
    assert gg[0][1, 1:7].abs().max() == 0 and gg[0][1, 0].abs().max() > 0


def test_without_grad_it_only_computes_the_loss():
    torch.manual_seed(1)
    head = nn.Linear(8, 30)
    x, y = torch.randn(40, 8), torch.randint(0, 30, (40,))
    with torch.no_grad():
        got, acc = token_loss(x, head, y, rows=16)
        want, want_acc = unfused(x, head, y)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)
    assert acc == want_acc


def test_bf16_autocast_matches_the_unfused_head_and_keeps_fp32_grads():
    torch.manual_seed(2)
    head = nn.Linear(32, 256)
    x = torch.randn(96, 32, requires_grad=True)
    y = torch.randint(0, 256, (96,))
    res = []
    for f in (unfused, lambda *a: token_loss(*a, rows=40)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = f(x, head, y)
        res.append((loss, torch.autograd.grad(loss, [x, head.weight, head.bias])))
    (want, gw), (got, gg) = res
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(gg, gw, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 2e-2 * b.norm()


def test_nothing_of_the_logits_size_is_kept_for_backward():
    head = nn.Linear(16, 512)
    x, y = torch.randn(64, 16, requires_grad=True), torch.randint(0, 512, (64,))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        token_loss(x, head, y, rows=16)
    assert kept and max(kept) < 64 * 512
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        unfused(x, head, y)
    assert max(kept) >= 64 * 512  # the unfused head keeps its (M, K) log-softmax


@pytest.mark.parametrize("objective", ["mapet", "beit"])
def test_objective_loss_is_the_cross_entropy_of_its_logits(objective):
    torch.manual_seed(3)
    cfg = ViTConfig(image_size=32, patch_size=8, dim=16, depth=2, heads=2, drop_path=0.0)
    net = (MaPeT(cfg, 40) if objective == "mapet" else BEiT(cfg, 40)).double()
    g = torch.Generator().manual_seed(0)
    images, targets = (
        torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
        torch.randint(0, 40, (2, 16)),
    )
    if objective == "mapet":
        aux = random_orders(2, 16, g)
    else:  # a full mask and one that stopped short: the loss is over the 6 + 3 masked patches
        aux = torch.zeros(2, 16, dtype=torch.bool)
        aux[0, torch.randperm(16, generator=g)[: net.num_masked]] = True
        aux[1, [2, 9, 10]] = True
    logits, y = net(images, targets, aux)
    assert objective == "mapet" or logits.shape[0] == 9
    want = F.cross_entropy(logits.flatten(0, -2), y.flatten())
    gw = torch.autograd.grad(want, list(net.parameters()))
    got, acc = net.loss(images, targets, aux)
    gg = torch.autograd.grad(got, list(net.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert acc.item() == (logits.argmax(-1) == y).double().mean().item()
    for a, b in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
