"""Shared test builders."""

from __future__ import annotations

from pathlib import Path

import yaml

from iln.config.params import TrainParams

ROOT = Path(__file__).resolve().parents[1]

TRAIN_DEFAULTS = dict(
    iterations=10,
    batch_size=2,
    lq_patch=16,
    lr=2.0e-4,
    betas=(0.9, 0.99),
    milestones=(1000,),
    lr_gamma=0.5,
    ema_decay=0.999,
    grad_clip=0.0,
    kld_weight=0.0,
    seed=1,
    checkpoint_every=5,
    log_every=1,
    probe_every=0,
    probe_images=1,
    probe_per_block=False,
    train_set="default_train",
    amp="fp32",
    compile=False,
    device="cpu",
    num_workers=0,
    threads=0,
)


def train_settings(**overrides) -> TrainParams:
    return TrainParams(**{**TRAIN_DEFAULTS, **overrides})


def train_summary(depths: tuple[int, ...], width: int) -> dict:
    """train/summary.json as the train stage writes it, the network size under "model"."""
    return {
        "steps": 300,
        "resumed_from": None,
        "seconds_per_step": 0.5,
        "final_loss": 0.01,
        "parameters": 1000,
        "world_size": 1,
        "model": {"arch": "hat_tiny", "embed_dim": width, "depths": list(depths)},
    }


def write_params(path: Path, **sections: dict) -> Path:
    """The shipped params.yaml with some sections' keys replaced (stages validate the whole
    file)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def assert_same_weights(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Every floating-point tensor of state dict ``a`` within ``rel`` of ``b``'s, relative in
    the L2 norm (float rounding differs between batch splits; Adam amplifies it a little)."""
    import torch

    assert a.keys() == b.keys()
    for key, va in a.items():
        if va.is_floating_point():
            diff = (va - b[key]).norm() / b[key].norm().clamp_min(1e-12)
            assert diff <= rel, f"{key}: relative difference {float(diff):.2e} > {rel:.0e}"
        else:
            assert torch.equal(va, b[key]), key
