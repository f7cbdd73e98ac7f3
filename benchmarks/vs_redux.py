"""Our i-LN HAT against traiNNer-redux's ``hat_iln``, on equal weights, in eval and training mode.

Usage (from the repository root, with ``src`` on the path)::

    python -m benchmarks.vs_redux CHECKOUT [--steps 5]

``CHECKOUT`` is a clone of github.com/the-database/traiNNer-redux; its ``hat_iln_arch.py``
and ``arch_util.py`` are imported from ``CHECKOUT/traiNNer/archs`` in this process, with
minimal stand-ins for the few names they take from spandrel, einops and the rest of
traiNNer (nothing is installed, nothing of theirs is copied).

Their model has no input encoding (no mean shift, stdnorm or img_range), so ours is compared
through our own: ``ours(x)`` against ``decode(theirs(encode(x)))``. Both are built with the
same hyper-parameters, our weights are loaded into theirs (the keys are the same), and
stochastic depth is 0.

- eval mode: plain i-LN (``iln``) on float64 inputs of several sizes, grey and RGB.
- training mode (float32: their running-std update mixes a float32 step size into the
  buffer's dtype, so it runs in float32 only): our ``iln_clamp`` (traiNNer-redux's
  running-std clamp) trained side by side with theirs for ``--steps`` Adam steps on the
  same batches; some batches are scaled up so that the batch std spikes past twice the
  running std and the clamp engages. Losses, weights and every norm's running std are
  compared after every step, then outputs in eval mode.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.vs_official import _rearrange, _Registry, _to_2tuple
from iln.models import build_model

# A small i-LN HAT that still has every part (two groups, shifted windows, OCAB).
SMALL = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 2), window_size=8)
TOLERANCE = 1e-10  # eval mode, float64
TRAIN_TOLERANCE = 1e-5  # training mode, float32 (their running-std update takes float32 only)


def _pad_to_multiple(x: Tensor, multiple: int, *, mode: str = "constant") -> Tensor:
    """Stand-in for spandrel's helper: pad bottom and right to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode) if pad_h or pad_w else x


@contextmanager
def _redux_imports(checkout: Path) -> Iterator[None]:
    """sys.modules entries that let traiNNer-redux's two arch files import."""
    archs = checkout / "traiNNer" / "archs"
    for name in ("hat_iln_arch.py", "arch_util.py"):
        if not (archs / name).is_file():
            raise FileNotFoundError(f"{archs / name} not found: is {checkout} traiNNer-redux?")

    def module(name: str, path: list[str] | None = None, **attrs: object) -> types.ModuleType:
        mod = types.ModuleType(name)
        if path is not None:
            mod.__path__ = path
        mod.__dict__.update(attrs)
        return mod

    stubs = {
        "traiNNer": module("traiNNer", []),
        "traiNNer.utils": module("traiNNer.utils", []),
        "traiNNer.utils.registry": module("traiNNer.utils.registry", ARCH_REGISTRY=_Registry()),
        "traiNNer.utils.download_util": module(
            "traiNNer.utils.download_util", load_file_from_url=None
        ),
        "traiNNer.archs": module("traiNNer.archs", [str(archs)]),
        "spandrel": module("spandrel", []),
        "spandrel.util": module("spandrel.util", [], store_hyperparameters=lambda: lambda cls: cls),
        "spandrel.util.timm": module(
            "spandrel.util.timm", to_2tuple=_to_2tuple, trunc_normal_=nn.init.trunc_normal_
        ),
        "spandrel.architectures": module("spandrel.architectures", []),
        "spandrel.architectures.__arch_helpers": module(
            "spandrel.architectures.__arch_helpers", []
        ),
        "spandrel.architectures.__arch_helpers.padding": module(
            "spandrel.architectures.__arch_helpers.padding", pad_to_multiple=_pad_to_multiple
        ),
        "spandrel.architectures.__arch_helpers.dysample": module(
            "spandrel.architectures.__arch_helpers.dysample", DySample=nn.Module
        ),
    }
    if importlib.util.find_spec("einops") is None:
        stubs["einops"] = module("einops", rearrange=_rearrange)
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        for name in ("traiNNer.archs.hat_iln_arch", "traiNNer.archs.arch_util"):
            sys.modules.pop(name, None)


def redux_hat_iln(checkout: Path) -> type[nn.Module]:
    """traiNNer-redux's ``HAT_iLN`` class from ``checkout``."""
    with _redux_imports(checkout):
        return importlib.import_module("traiNNer.archs.hat_iln_arch").HAT_iLN


def build_twins(
    cls: type[nn.Module],
    norm: str,
    *,
    in_chans: int = 3,
    scale: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[nn.Module, nn.Module]:
    """(ours, theirs) with equal weights; ``norm`` is "iln" or "iln_clamp"."""
    ours = build_model(
        "hat_tiny",
        norm=norm,
        scale=scale,
        generator=torch.Generator().manual_seed(seed),
        drop_path_rate=0.0,
        stdnorm=False,
        in_chans=in_chans,
        **SMALL,
    )
    hp = ours.hparams
    theirs = cls(
        upscale=scale,
        in_chans=in_chans,
        embed_dim=hp["embed_dim"],
        depths=list(hp["depths"]),
        num_heads=list(hp["num_heads"]),
        window_size=hp["window_size"],
        compress_ratio=hp["compress_ratio"],
        squeeze_factor=hp["squeeze_factor"],
        conv_scale=hp["conv_scale"],
        overlap_ratio=hp["overlap_ratio"],
        mlp_ratio=hp["mlp_ratio"],
        drop_path_rate=0.0,
    )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(dtype), theirs.to(dtype)


def through_our_encoding(ours: nn.Module, theirs: nn.Module, x: Tensor) -> Tensor:
    """Their output for our input, through our input encoding (theirs has none)."""
    return ours.input_norm.decode(theirs(ours.input_norm.encode(x)))


def eval_differences(cls: type[nn.Module], seed: int = 0) -> dict[str, float]:
    """Max |ours - theirs| in eval mode (plain i-LN) for grey and RGB, odd and even sizes."""
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for in_chans in (3, 1):
        ours, theirs = build_twins(cls, "iln", in_chans=in_chans, seed=seed)
        ours.eval()
        theirs.eval()
        for h, w in ((16, 16), (13, 21), (24, 9)):
            x = torch.rand(2, in_chans, h, w, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                diff = (ours(x) - through_our_encoding(ours, theirs, x)).abs().max().item()
            result[f"eval in_chans {in_chans} {h}x{w}"] = diff
    return result


@dataclass(frozen=True)
class TrainStep:
    step: int
    loss_diff: float
    weight_diff: float
    running_std_diff: float
    clamped: bool  # whether some norm's batch std was above twice its running std


def _running_stds(model: nn.Module) -> list[Tensor]:
    return [b for n, b in model.named_buffers() if n.endswith("std_ema")]


def train_differences(
    cls: type[nn.Module], steps: int, seed: int = 0
) -> tuple[list[TrainStep], float]:
    """``iln_clamp`` vs their training-mode iLN: Adam steps on the same batches, where every
    third batch is scaled by 8 (a spike past twice the running std); then the largest output
    difference of the trained pair in eval mode (branch scales clamped by the running std)."""
    ours, theirs = build_twins(cls, "iln_clamp", seed=seed, dtype=torch.float32)
    ours.train()
    theirs.train()
    optimizers = [
        torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.9, 0.99)) for m in (ours, theirs)
    ]
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for step in range(1, steps + 1):
        x = torch.rand(2, 3, 16, 16, generator=gen)
        gt = torch.rand(2, 3, 32, 32, generator=gen)
        x = x * 8 if step % 3 == 0 else x
        before = [s.clone() for s in _running_stds(ours)]
        losses = []
        for opt, fwd in (
            (optimizers[0], ours),
            (optimizers[1], lambda t: through_our_encoding(ours, theirs, t)),
        ):
            opt.zero_grad(set_to_none=True)
            loss = F.l1_loss(fwd(x), gt)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # a clamped spike raises a running std by alpha = 0.1%; ordinary steps far less
        clamped = any(
            after.item() >= prev.item() * (1 + 0.999e-3) > 0
            for prev, after in zip(before, _running_stds(ours), strict=True)
        )
        weights = dict(theirs.named_parameters())
        weight_diff = max((p - weights[n]).abs().max().item() for n, p in ours.named_parameters())
        std_diff = max(
            (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()
            for a, b in zip(_running_stds(ours), _running_stds(theirs), strict=True)
        )
        rows.append(TrainStep(step, abs(losses[0] - losses[1]), weight_diff, std_diff, clamped))
    ours.eval()
    theirs.eval()
    x = torch.rand(2, 3, 13, 21, generator=gen) * 4  # some images clamped
    with torch.no_grad():
        eval_diff = (ours(x) - through_our_encoding(ours, theirs, x)).abs().max().item()
    return rows, eval_diff


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="clone of github.com/the-database/traiNNer-redux")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cls = redux_hat_iln(args.checkout)
    worst = 0.0
    for case, diff in eval_differences(cls).items():
        print(f"{case}: max |ours - theirs| {diff:.1e}")
        worst = max(worst, diff)
    ok = worst <= TOLERANCE
    verdict = "agree" if ok else "DIFFER"
    print(f"eval (float64): max difference {worst:.1e}, {verdict} within {TOLERANCE:g}")
    worst = 0.0
    print("training mode (float32; iln_clamp vs their iLN), Adam lr 2e-4, every third batch x8:")
    rows, eval_diff = train_differences(cls, args.steps)
    for r in rows:
        print(
            f"  step {r.step}: |loss diff| {r.loss_diff:.1e}, max |w diff| {r.weight_diff:.1e},"
            f" running std diff {r.running_std_diff:.1e}{', clamp engaged' if r.clamped else ''}"
        )
        worst = max(worst, r.loss_diff, r.weight_diff, r.running_std_diff)
    print(f"  then eval mode on a brighter input: max |ours - theirs| {eval_diff:.1e}")
    worst = max(worst, eval_diff)
    train_ok = worst <= TRAIN_TOLERANCE
    print(
        f"training: max difference {worst:.1e}, "
        f"{'agree' if train_ok else 'DIFFER'} within {TRAIN_TOLERANCE:g}"
    )
    return 0 if ok and train_ok else 1


if __name__ == "__main__":
    sys.exit(main())
