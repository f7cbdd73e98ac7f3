"""What ``train.grad_checkpoint`` saves and costs: activation memory kept for the backward pass
and the time of a training step, with and without recomputing each block.

    PYTHONPATH=src python -m benchmarks.grad_checkpoint [--arch hat --batch 2 --lr-patch 64]

Memory is counted exactly, not sampled: the bytes of every distinct tensor storage autograd
keeps for the backward pass during one forward (``torch.autograd.graph.saved_tensors_hooks``),
so the figure does not depend on the allocator or the machine's load. Peak resident memory of
a full step is also reported (one fresh process per mode; it includes the model, Adam and the
recomputation's transient tensors). Time: the median of interleaved rounds of one full step
(forward, L1 backward, Adam) per mode, in one process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from benchmarks.timing import random_pair, time_interleaved, train_step
from iln.models import build_model


def _setup(args: argparse.Namespace):
    """The model (training mode) and its (lq, gt, stochastic-depth noise) batch."""
    model = build_model(
        args.arch, norm=args.norm, scale=args.scale, generator=torch.Generator().manual_seed(0)
    ).train()
    g = torch.Generator().manual_seed(0)
    lq, gt = random_pair(args.batch, args.lr_patch, args.scale, g)
    return model, lq, gt, torch.rand(args.batch, model.drop_sites, generator=g)


def saved_bytes(model: torch.nn.Module, lq: torch.Tensor, noise: torch.Tensor, ckpt: bool) -> int:
    """Bytes of the distinct storages autograd keeps from one forward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(lq, drop_noise=noise, checkpoint=ckpt)
    del out
    return sum(seen.values())


def peak_rss_of_a_step(args: argparse.Namespace, ckpt: bool) -> int:
    """Peak resident bytes of a fresh process that builds the model and runs one step."""
    code = (
        "import sys, json, resource; sys.argv = json.loads(sys.argv[1]);"
        "from benchmarks.grad_checkpoint import _child; _child()"
    )
    argv = ["child", *sys.argv[1:], "--child-mode", "ckpt" if ckpt else "plain"]
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def _child() -> None:
    args = parse_args(sys.argv[1:])
    model, lq, gt, noise = _setup(args)
    train_step(model, lq, gt, drop_noise=noise, checkpoint=args.child_mode == "ckpt")()
    print(_peak_rss_bytes())


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec
    (``ru_maxrss`` keeps the parent's peak across fork and exec); elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="hat")
    parser.add_argument("--norm", default="iln")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr-patch", type=int, default=64, help="LR patch side, pixels")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    parser.add_argument(
        "--only",
        choices=("all", "memory", "time"),
        default="all",
        help="memory: saved activations and peak RSS only; time: step times only",
    )
    parser.add_argument("--child-mode", choices=("plain", "ckpt"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, lq, gt, noise = _setup(args)
    result: dict = {
        "setting": f"{args.arch} {args.norm} x{args.scale}, batch {args.batch}, LR patch "
        f"{args.lr_patch}, {torch.get_num_threads()} threads",
    }
    if args.only in ("all", "memory"):
        saved = {ckpt: saved_bytes(model, lq, noise, ckpt) for ckpt in (False, True)}
        rss = {ckpt: peak_rss_of_a_step(args, ckpt) for ckpt in (False, True)}
        result["saved_activation_bytes"] = {"plain": saved[False], "grad_checkpoint": saved[True]}
        result["saved_fraction"] = saved[True] / saved[False]
        result["peak_rss_bytes"] = {"plain": rss[False], "grad_checkpoint": rss[True]}
    if args.only in ("all", "time"):
        steps = {
            mode: train_step(model, lq, gt, drop_noise=noise, checkpoint=mode == "grad_checkpoint")
            for mode in ("plain", "grad_checkpoint")
        }
        times = time_interleaved(steps, repeats=args.rounds, warmup=1)
        result["seconds_per_step"] = {mode: t.median_s for mode, t in times.items()}
        result["rounds"] = {mode: list(t.samples_s) for mode, t in times.items()}
        result["time_ratio"] = times["grad_checkpoint"].median_s / times["plain"].median_s
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
