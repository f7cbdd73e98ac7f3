"""A hat_1 training step of ours against the authors' own HAT / HAT_iLN, on equal weights.

Usage (from the repository root, with ``src`` on the path)::

    python -m benchmarks.vs_official CHECKOUT [--threads 1] [--rounds 7]

``CHECKOUT`` is a clone of the authors' repository (github.com/2minkyulee/i-LN); their
architecture files are imported from ``CHECKOUT/iLN/basicsr/archs`` in this process. Their
package imports BasicSR and einops; the few names the two files use from them are replaced
by minimal stand-ins here (nothing is installed, nothing of theirs is copied).

For LN and i-LN the script builds our model, loads the same weights into theirs
(``to_official_state_dict``), checks that outputs and gradients agree, then times full
training steps (forward, L1 loss, backward, Adam) of the four models round-robin in one
process and prints the paired ratios (theirs / ours, and our i-LN / LN).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.timing import paired_ratio, random_pair, time_interleaved, train_step
from iln.models import build_model, to_official_state_dict
from iln.models.checkpoint import official_key_map

# The official HAT_1 ("HAT-mini") network options (options/train/HAT-mini/*.yml).
OFFICIAL_HAT_1 = dict(
    in_chans=3,
    img_size=64,
    window_size=16,
    compress_ratio=24,
    squeeze_factor=24,
    conv_scale=0.01,
    overlap_ratio=0.5,
    img_range=1.0,
    depths=[6] * 6,
    embed_dim=96,
    num_heads=[6] * 6,
    mlp_ratio=2,
    upsampler="pixelshuffle",
    resi_connection="1conv",
)
TOLERANCE = 1e-5  # max |ours - theirs| of outputs, and of gradients relative to their scale


class _Registry:
    """Stand-in for BasicSR's ARCH_REGISTRY: registering is a no-op."""

    def register(self, obj: object = None):
        return obj if obj is not None else (lambda cls: cls)

    def _do_register(self, name: str, obj: object) -> None:
        pass


def _to_2tuple(x: object) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _rearrange(t: Tensor, pattern: str, **sizes: int) -> Tensor:
    """The one einops pattern HAT's OCAB uses, as view + permute + reshape."""
    if pattern != "b (nc ch owh oww) nw -> nc (b nw) (owh oww) ch":
        raise NotImplementedError(f"einops stand-in: pattern {pattern!r} not supported")
    nc, ch, owh, oww = sizes["nc"], sizes["ch"], sizes["owh"], sizes["oww"]
    b, _, nw = t.shape
    t = t.view(b, nc, ch, owh * oww, nw).permute(1, 0, 4, 3, 2)  # nc, b, nw, owh*oww, ch
    return t.reshape(nc, b * nw, owh * oww, ch)


@contextmanager
def _official_imports(checkout: Path) -> Iterator[None]:
    """sys.modules entries that let the authors' two arch files import, removed afterwards."""
    archs = checkout / "iLN" / "basicsr" / "archs"
    for name in ("hat_arch.py", "hat_iLN_arch.py"):
        if not (archs / name).is_file():
            raise FileNotFoundError(f"{archs / name} not found: is {checkout} a clone of i-LN?")

    def package(name: str, path: list[str]) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__path__ = path
        return module

    registry = types.ModuleType("basicsr.utils.registry")
    registry.ARCH_REGISTRY = _Registry()
    arch_util = types.ModuleType("basicsr.archs.arch_util")
    arch_util.to_2tuple = _to_2tuple
    arch_util.trunc_normal_ = nn.init.trunc_normal_
    stubs = {
        "basicsr": package("basicsr", []),
        "basicsr.utils": package("basicsr.utils", []),
        "basicsr.utils.registry": registry,
        "basicsr.archs": package("basicsr.archs", [str(archs)]),
        "basicsr.archs.arch_util": arch_util,
    }
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")
        einops.rearrange = _rearrange
        stubs["einops"] = einops
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in ("basicsr.archs.hat_arch", "basicsr.archs.hat_iLN_arch"):
            sys.modules.pop(name, None)


def official_classes(checkout: Path) -> tuple[type[nn.Module], type[nn.Module]]:
    """(HAT, HAT_iLN) of the authors' code in ``checkout``."""
    with _official_imports(checkout):
        hat = importlib.import_module("basicsr.archs.hat_arch")
        hat_iln = importlib.import_module("basicsr.archs.hat_iLN_arch")
    return hat.HAT, hat_iln.HAT_iLN


def build_pair(
    checkout_classes: tuple[type[nn.Module], type[nn.Module]], norm: str, scale: int, seed: int
) -> tuple[nn.Module, nn.Module]:
    """(ours, theirs) hat_1 models with ``norm`` ("ln" or "iln") holding the same weights."""
    ours = build_model(
        "hat_1", norm=norm, scale=scale, generator=torch.Generator().manual_seed(seed)
    )
    hat, hat_iln = checkout_classes
    cls = hat_iln if norm == "iln" else hat
    theirs = cls(upscale=scale, stdnorm=norm == "iln", **OFFICIAL_HAT_1)
    theirs.load_state_dict(to_official_state_dict(ours), strict=True)
    return ours, theirs


def max_differences(ours: nn.Module, theirs: nn.Module, lq: Tensor, gt: Tensor) -> dict:
    """Largest output difference and largest gradient difference (relative to the largest
    gradient of the tensor) of an L1 loss, both models in eval mode (no stochastic depth)."""
    result = {}
    grads = []
    outputs = []
    for model in (ours, theirs):
        model.eval()
        model.zero_grad(set_to_none=True)
        out = model(lq)
        F.l1_loss(out, gt).backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    result["output"] = (outputs[0] - outputs[1]).abs().max().item()
    names = official_key_map(ours)  # our name -> theirs
    worst = 0.0
    for name, g in grads[0].items():
        other = grads[1][names[name]]
        worst = max(worst, ((g - other).abs().max() / g.abs().max().clamp_min(1e-12)).item())
    result["gradient_relative"] = worst
    return result


# operator -> the part of a step it belongs to, for ``--profile``; anything else is "other"
OP_CLASSES = {
    "attention: matmuls, softmax, fused kernel": (
        "aten::bmm",
        "aten::baddbmm",
        "aten::addmm_",  # baddbmm with beta=0 runs per matrix
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ),
    "linear layers (qkv, proj, MLP)": ("aten::mm", "aten::addmm"),
    "convolutions": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "copies and gathers": (
        "aten::copy_",
        "aten::index_select",
        "aten::index_add_",
        "aten::cat",
        "aten::stack",
        "aten::unfold_backward",
        "aten::roll",
        "aten::constant_pad_nd",
    ),
    "norms": (
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::native_group_norm",
        "aten::native_group_norm_backward",
    ),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
}


def profile_by_class(step) -> dict[str, float]:
    """Self CPU seconds of one call of ``step`` per class of ``OP_CLASSES`` (+ other, total)."""
    step()  # warm-up outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    owner = {op: name for name, ops in OP_CLASSES.items() for op in ops}
    seconds = dict.fromkeys([*OP_CLASSES, "other"], 0.0)
    for event in prof.key_averages():
        seconds[owner.get(event.key, "other")] += event.self_cpu_time_total / 1e6
    seconds["total"] = sum(seconds.values())
    return seconds


def print_profiles(profiles: dict[str, dict[str, float]]) -> None:
    names = list(profiles)
    print("| part of the step (self CPU s) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for part in profiles[names[0]]:
        cells = [
            f"{profiles[n][part]:.2f} ({profiles[n][part] / profiles[n]['total']:.0%})"
            for n in names
        ]
        print(f"| {part} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="clone of github.com/2minkyulee/i-LN")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr-patch", type=int, default=32)
    p.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--norms", nargs="+", default=["ln", "iln"], choices=["ln", "iln"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        action="store_true",
        help="then profile one step of each norm: ours, our reference path (fast=False), theirs",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    classes = official_classes(args.checkout)
    gen = torch.Generator().manual_seed(args.seed)
    lq, gt = random_pair(args.batch, args.lr_patch, args.scale, gen)
    steps = {}
    for norm in args.norms:
        ours, theirs = build_pair(classes, norm, args.scale, args.seed)
        diff = max_differences(ours, theirs, lq, gt)
        ok = diff["output"] <= TOLERANCE and diff["gradient_relative"] <= TOLERANCE
        print(
            f"{norm}: max |ours - theirs| output {diff['output']:.1e}, "
            f"gradients (relative) {diff['gradient_relative']:.1e} "
            f"({'agree' if ok else 'DIFFER'} within {TOLERANCE:g})"
        )
        if not ok:
            return 1
        steps[f"ours/{norm}"] = train_step(ours, lq, gt)
        steps[f"theirs/{norm}"] = train_step(theirs, lq, gt)

    print(
        f"timing {len(steps)} training steps round-robin: hat_1 x{args.scale}, batch "
        f"{args.batch}, LR patch {args.lr_patch}, {args.threads} thread(s), "
        f"{args.rounds} rounds after {args.warmup} warm-up"
    )
    timings = {
        k: t.to_dict()
        for k, t in time_interleaved(steps, repeats=args.rounds, warmup=args.warmup).items()
    }
    for name, t in timings.items():
        rounds = " ".join(f"{x:.2f}" for x in t["samples_s"])
        print(
            f"  {name:12s} median {t['median_s']:.3f} s  (CPU {t['cpu_median_s']:.3f} s)"
            f"  rounds: {rounds}"
        )
    for norm in args.norms:
        mine, other = timings[f"ours/{norm}"], timings[f"theirs/{norm}"]
        print(
            f"{norm}: theirs / ours = {paired_ratio(other, mine):.3f} "
            f"(CPU time {paired_ratio(other, mine, key='cpu_samples_s'):.3f})"
        )
    if {"ln", "iln"} <= set(args.norms):
        a, b = timings["ours/iln"], timings["ours/ln"]
        print(
            f"ours i-LN / LN = {paired_ratio(a, b):.3f} "
            f"(CPU time {paired_ratio(a, b, key='cpu_samples_s'):.3f})"
        )
    for norm in args.norms if args.profile else ():
        ours, theirs = build_pair(classes, norm, args.scale, args.seed)
        reference = build_model(
            "hat_1",
            norm=norm,
            scale=args.scale,
            fast=False,
            generator=torch.Generator().manual_seed(args.seed),
        )
        print(f"\n{norm}: one profiled training step each")
        print_profiles(
            {
                "ours": profile_by_class(train_step(ours, lq, gt)),
                "ours, reference path": profile_by_class(train_step(reference, lq, gt)),
                "theirs": profile_by_class(train_step(theirs, lq, gt)),
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
