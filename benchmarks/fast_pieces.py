"""What each piece of the fast path (``iln.models.fast``) saves on a training step.

Usage (from the repository root, with ``src`` on the path)::

    python -m benchmarks.fast_pieces [--preset hat_1] [--norm iln] [--rounds 5]

Times, round-robin in one process, a full training step (forward, L1, backward, fused
Adam) of the fast path as it is and of the fast path with one piece at a time swapped
for the plain computation of the reference code, then prints each swapped step's time
relative to the full fast path (the median of per-round ratios; > 1 means the piece
saves time) and the whole reference path (``build_model(..., fast=False)``) for scale.
The swap replaces a function of ``iln.models.fast`` for the duration of one step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from benchmarks.timing import paired_ratio, random_pair, time_interleaved, train_step
from iln.models import build_model, common
from iln.models import fast as fast_ops


def _reference_standardize_affine(x: Tensor, weight: Tensor, bias: Tensor, dims: int, eps: float):
    var, mean = torch.var_mean(x, dim=tuple(range(-dims, 0)), correction=0, keepdim=True)
    std = torch.sqrt(var + eps)
    return (x - mean) / std * weight + bias, std


def _reference_overlapping_windows(grid: Tensor, size: int, stride: int, heads: int):
    b, c2 = grid.shape[0], grid.shape[-1]
    kv = grid.unfold(1, size, stride).unfold(2, size, stride)  # (B, nWh, nWw, 2C, size, size)
    kv = kv.reshape(b, -1, 2, heads, c2 // (2 * heads), size * size).permute(2, 0, 1, 3, 5, 4)
    kv = kv.reshape(2, -1, heads, size * size, c2 // (2 * heads))
    return kv[0], kv[1]


# piece -> the functions of ``iln.models.fast`` it consists of, and their reference versions
PIECES: dict[str, dict[str, Callable]] = {
    "attention": {  # the fast functions also take the kernel choice, which the reference ignores
        "attention": lambda q, k, v, bias, scale, mask=None, impl="auto": common.attention(
            q, k, v, bias, scale, mask
        ),
        "packed_attention": lambda qkv, bias, scale, mask=None, impl="auto": (
            common.qkv_attention(qkv, bias, scale, mask)
        ),
    },
    "gather_bias": {"gather_bias": common.gather_bias},
    "standardize_affine": {"standardize_affine": _reference_standardize_affine},
    "image": {"image": lambda x, size: common.image(x, size, fast=False)},
    "overlapping_windows": {"overlapping_windows": _reference_overlapping_windows},
    "spatial_mean": {"spatial_mean": lambda x: x.mean((2, 3), keepdim=True)},
}


@contextmanager
def swapped(piece: str | None) -> Iterator[None]:
    """``iln.models.fast`` with ``piece`` replaced by its reference (None: nothing)."""
    saved = {name: getattr(fast_ops, name) for name in PIECES.get(piece, {})}
    for name, reference in PIECES.get(piece, {}).items():
        setattr(fast_ops, name, reference)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(fast_ops, name, original)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="hat_1")
    p.add_argument("--norm", default="iln")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr-patch", type=int, default=32)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pieces", nargs="+", default=list(PIECES), choices=list(PIECES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    lq, gt = random_pair(args.batch, args.lr_patch, args.scale, torch.Generator().manual_seed(0))

    def step_of(piece: str | None, fast: bool = True) -> Callable[[], None]:
        model = build_model(
            args.preset,
            norm=args.norm,
            scale=args.scale,
            fast=fast,
            generator=torch.Generator().manual_seed(0),
        )
        step = train_step(model, lq, gt)

        def swapped_step() -> None:
            with swapped(piece):
                step()

        return swapped_step

    steps = {"fast path": step_of(None)}
    steps.update({f"without {piece}": step_of(piece) for piece in args.pieces})
    steps["reference path"] = step_of(None, fast=False)
    print(
        f"{args.preset} {args.norm}: training step x{args.scale}, batch {args.batch}, LR patch "
        f"{args.lr_patch}, {args.threads} thread(s), {args.rounds} rounds after "
        f"{args.warmup} warm-up, round-robin"
    )
    timings = {
        k: t.to_dict()
        for k, t in time_interleaved(steps, repeats=args.rounds, warmup=args.warmup).items()
    }
    base = timings["fast path"]
    for name, t in timings.items():
        ratio = paired_ratio(t, base)
        cpu = paired_ratio(t, base, key="cpu_samples_s")
        print(
            f"  {name:30s} median {t['median_s']:.3f} s   / fast path {ratio:.3f} "
            f"(CPU time {cpu:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
