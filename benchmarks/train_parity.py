"""Training parity: our HAT against the authors' HAT / HAT_iLN, trained side by side.

Usage (from the repository root, with ``src`` on the path)::

    python -m benchmarks.train_parity CHECKOUT [--arch hat_tiny] [--steps 20] [--dtype float64]

``CHECKOUT`` is a clone of the authors' repository (github.com/2minkyulee/i-LN); their
architecture files are imported from it at run time (``benchmarks.vs_official``), nothing
of theirs is copied. For each norm (LN: their ``HAT``, stdnorm off; i-LN: their
``HAT_iLN``, stdnorm on) the script builds our model, loads the same initial weights into
theirs (``to_official_state_dict``), sets stochastic depth to 0 in both, and trains both
for ``--steps`` steps on the same batches: L1 loss, Adam (``--lr``, default 2e-4; betas
(0.9, 0.99), no weight decay; ours with the pipeline's optimiser
``iln.training.loop.adam``, theirs with ``torch.optim.Adam`` as BasicSR builds it). After
every step it compares the two losses and every weight (through the official key map) and
prints the largest differences.

In float64 the two trajectories agree to rounding (differences near 1e-15); in float32
they agree to float32 rounding, which Adam's normalised steps let grow slowly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.timing import ADAM_BETAS, ADAM_LR, random_pair
from benchmarks.vs_official import official_classes
from iln.models import build_model, to_official_state_dict
from iln.models.checkpoint import official_key_map
from iln.training.loop import adam

# Network options of ours that the authors' constructors take under the same name.
_SHARED_KEYS = (
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "compress_ratio",
    "squeeze_factor",
    "mlp_ratio",
    "conv_scale",
    "overlap_ratio",
    "img_range",
    "in_chans",
)


def official_options(hparams: dict) -> dict:
    """The authors' HAT constructor options for our resolved hyper-parameters, with
    stochastic depth off."""
    options = {k: hparams[k] for k in _SHARED_KEYS}
    options["depths"] = list(options["depths"])
    options["num_heads"] = list(options["num_heads"])
    return dict(
        options,
        img_size=64,
        drop_path_rate=0.0,
        upsampler="pixelshuffle",
        resi_connection="1conv",
        stdnorm=hparams["stdnorm"],
    )


def build_twins(
    classes: tuple[type[nn.Module], type[nn.Module]],
    arch: str,
    norm: str,
    scale: int,
    seed: int,
    dtype: torch.dtype,
) -> tuple[nn.Module, nn.Module]:
    """(ours, theirs) with ``norm`` ("ln" or "iln"), equal initial weights, drop path 0."""
    ours = build_model(
        arch,
        norm=norm,
        scale=scale,
        generator=torch.Generator().manual_seed(seed),
        drop_path_rate=0.0,
    )
    hat, hat_iln = classes
    cls = hat_iln if norm == "iln" else hat
    theirs = cls(upscale=scale, **official_options(ours.hparams))
    theirs.load_state_dict(to_official_state_dict(ours), strict=True)
    return ours.to(dtype), theirs.to(dtype)


@dataclass(frozen=True)
class StepComparison:
    step: int
    loss_ours: float
    loss_theirs: float
    weight_abs: float  # max |w_ours - w_theirs| over all weights
    weight_rel: float  # max over tensors of that difference / max |w| of the tensor

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_ours - self.loss_theirs)


def weight_differences(ours: nn.Module, theirs: nn.Module) -> tuple[float, float]:
    """Largest absolute weight difference, and largest relative to the tensor's scale."""
    names = official_key_map(ours)  # our name -> theirs
    other = dict(theirs.named_parameters())
    worst_abs = worst_rel = 0.0
    for name, p in ours.named_parameters():
        diff = (p.detach() - other[names[name]].detach()).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(p.detach().abs().max().item(), 1e-30))
    return worst_abs, worst_rel


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, lq: Tensor, gt: Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.l1_loss(model(lq), gt)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_side_by_side(
    ours: nn.Module,
    theirs: nn.Module,
    *,
    steps: int,
    batch: int,
    lr_patch: int,
    scale: int,
    seed: int,
    lr: float = ADAM_LR,
) -> list[StepComparison]:
    """Train both models for ``steps`` steps on the same random batches (Adam, L1) and
    compare losses and weights after every step."""
    dtype = next(ours.parameters()).dtype
    opt_ours = adam(list(ours.parameters()), lr=lr, betas=ADAM_BETAS)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=lr, betas=ADAM_BETAS)
    ours.train()
    theirs.train()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(1, steps + 1):
        lq, gt = (t.to(dtype) for t in random_pair(batch, lr_patch, scale, gen))
        loss_ours = _step(ours, opt_ours, lq, gt)
        loss_theirs = _step(theirs, opt_theirs, lq, gt)
        rows.append(StepComparison(step, loss_ours, loss_theirs, *weight_differences(ours, theirs)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="clone of github.com/2minkyulee/i-LN")
    p.add_argument("--arch", default="hat_tiny", choices=["hat_tiny", "hat_1"])
    p.add_argument("--norms", nargs="+", default=["ln", "iln"], choices=["ln", "iln"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr-patch", type=int, default=32)
    p.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--lr", type=float, default=ADAM_LR, help="Adam learning rate of both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest loss and relative weight difference accepted "
        "(default 1e-10 in float64, 1e-3 in float32)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tolerance = args.tolerance or (1e-10 if dtype == torch.float64 else 1e-3)
    classes = official_classes(args.checkout)
    failed = False
    for norm in args.norms:
        ours, theirs = build_twins(classes, args.arch, norm, args.scale, args.seed, dtype)
        print(
            f"{norm}: {args.arch} x{args.scale}, {args.dtype}, batch {args.batch}, "
            f"LR patch {args.lr_patch}, Adam lr {args.lr:g} betas {ADAM_BETAS}, drop path 0"
        )
        print("  step  loss ours     |loss diff|  max |w diff|  max rel w diff")
        rows = train_side_by_side(
            ours,
            theirs,
            steps=args.steps,
            batch=args.batch,
            lr_patch=args.lr_patch,
            scale=args.scale,
            seed=args.seed,
            lr=args.lr,
        )
        for r in rows:
            print(
                f"  {r.step:4d}  {r.loss_ours:.9f}  {r.loss_diff:.2e}     "
                f"{r.weight_abs:.2e}      {r.weight_rel:.2e}"
            )
        loss_max = max(r.loss_diff for r in rows)
        rel_max = max(r.weight_rel for r in rows)
        ok = loss_max <= tolerance and rel_max <= tolerance
        failed |= not ok
        print(
            f"{norm}: over {args.steps} steps max |loss diff| {loss_max:.2e}, max weight diff "
            f"{max(r.weight_abs for r in rows):.2e} (relative {rel_max:.2e}): "
            f"{'agree' if ok else 'DIFFER'} within {tolerance:g}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
