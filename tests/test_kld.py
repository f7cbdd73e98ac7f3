"""The feature KL regulariser (paper Table 8): known values, gradients, weight 0 = plain L1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iln.training.kld import FeatureKL, gaussian_kl
from iln.models.restorer import WindowedRestorer
from iln.training.loop import fit
from tests.helpers import train_settings


class Group(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        return x + self.fc(x)


class TinyIR(nn.Module):
    """x2 restorer following the contract: `layers` of (B, N, C) groups, then `norm`."""

    residual_groups = WindowedRestorer.residual_groups  # the restorer's own accessors
    group_blocks = WindowedRestorer.group_blocks

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, dim, 3, padding=1)
        self.layers = nn.ModuleList(Group(dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.conv_last = nn.Conv2d(dim, 12, 3, padding=1)
        self.up = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, 2H, 2W)
        b, _, h, w = x.shape
        t = self.conv_first(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for layer in self.layers:
            t = layer(t)
        t = self.norm(t).transpose(1, 2).reshape(b, -1, h, w)
        return self.up(self.conv_last(t))


def test_gaussian_kl_known_values():
    standard = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # mean 0, variance 1
    assert gaussian_kl(standard).item() == pytest.approx(0.0, abs=1e-6)
    x = torch.tensor([[[3.0, 5.0], [5.0, 3.0]]])  # mean 4, variance 1: 0.5 * 16
    assert gaussian_kl(x).item() == pytest.approx(8.0, rel=1e-6)
    y = 2.0 * standard  # mean 0, variance 4: 0.5 * (4 - 1 - ln 4)
    assert gaussian_kl(y).item() == pytest.approx(0.5 * (3.0 - math.log(4.0)), rel=1e-6)
    both = torch.cat([x, y])  # per image
    assert gaussian_kl(both).tolist() == pytest.approx([8.0, 0.5 * (3.0 - math.log(4.0))])
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        gaussian_kl(torch.zeros(2, 3))


def test_penalty_averages_groups_and_images_and_removes_its_hooks():
    torch.manual_seed(0)
    model = TinyIR()
    lq = torch.rand(3, 3, 5, 5)
    outputs = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outputs.append(o)) for layer in model.layers
    ]
    with FeatureKL(model) as kl:
        model(lq)
        penalty = kl.penalty()
    for h in handles:
        h.remove()
    expected = torch.stack([gaussian_kl(o).mean() for o in outputs]).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not layer._forward_hooks for layer in model.layers)
    with pytest.raises(RuntimeError, match="no group output"):
        kl.penalty()
    with pytest.raises(AttributeError, match="residual_groups"):
        FeatureKL(nn.Linear(2, 2))


def test_penalty_gradients_reach_every_group():
    torch.manual_seed(0)
    model = TinyIR()
    with FeatureKL(model) as kl:
        model(torch.rand(2, 3, 5, 5))
        kl.penalty().backward()
    for layer in model.layers:
        assert layer.fc.weight.grad is not None and layer.fc.weight.grad.abs().sum() > 0
    assert model.conv_first.weight.grad.abs().sum() > 0
    assert model.conv_last.weight.grad is None  # after the groups: no gradient from the penalty


class Pairs(torch.utils.data.Dataset):
    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(k)
        return {"lq": torch.rand(3, 6, 6, generator=g), "gt": torch.rand(3, 12, 12, generator=g)}


def _fit(tmp_path, kld_weight: float) -> tuple[nn.Module, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = TinyIR()
    settings = train_settings(
        iterations=4, batch_size=2, checkpoint_every=4, log_every=1, kld_weight=kld_weight
    )
    _, result = fit(
        model,
        Pairs(),
        settings,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / f"kld{kld_weight}.pt",
        fingerprint="kld",
        progress=False,
    )
    return model, result.history


def test_training_loss_is_l1_plus_weighted_penalty(tmp_path):
    torch.manual_seed(0)
    initial = TinyIR()  # the same initial weights _fit builds
    batch = [Pairs()[k] for k in range(2)]  # step 1 reads samples 0 and 1
    lq = torch.stack([b["lq"] for b in batch])
    gt = torch.stack([b["gt"] for b in batch])
    with torch.no_grad(), FeatureKL(initial) as kl:
        l1 = F.l1_loss(initial(lq), gt).item()
        penalty = kl.penalty().item()
    assert penalty > 0.01
    plain, plain_history = _fit(tmp_path, 0.0)
    assert plain_history[0]["loss"] == pytest.approx(l1, rel=1e-6)  # weight 0: plain L1
    regularised, history = _fit(tmp_path, 0.5)
    assert history[0]["loss"] == pytest.approx(l1 + 0.5 * penalty, rel=1e-6)
    changed = [not torch.equal(a, b) for a, b in zip(plain.parameters(), regularised.parameters())]
    assert any(changed)
    for layer in regularised.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks
