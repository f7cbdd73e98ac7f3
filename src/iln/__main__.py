"""The ``iln`` command (also ``python -m iln``).

    iln restore WEIGHTS INPUT OUTPUT [--arch A --norm N --scale S] [--tile T] [--precision P]

restores one image or every image of a folder with a train-stage ``model.pt`` or a
BasicSR checkpoint (the authors' released weights), no ground truth needed.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from iln.data.io import ImageReadError
from iln.models import ARCHS, NORMS, SCALES
from iln.restore import (
    PRECISIONS,
    RestoreError,
    fp16_warning,
    input_images,
    load_model,
    output_paths,
    restore_files,
)
from iln.runtime import resolve_device


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iln", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser(
        "restore",
        help="restore an image or a folder of images",
        description="Restore INPUT (an image or a folder of images) into OUTPUT (a folder; "
        "PNGs named after the inputs), or into OUTPUT.png for a single image.",
    )
    sub.add_argument("weights", help="model.pt of the train stage, or a BasicSR checkpoint")
    sub.add_argument("input", help="an image file or a folder of images")
    sub.add_argument("output", help="output folder (or a .png file for a single input)")
    model = sub.add_argument_group("BasicSR checkpoints (a model.pt records these itself)")
    model.add_argument("--arch", choices=ARCHS)
    model.add_argument("--norm", choices=NORMS)
    model.add_argument("--scale", type=int, choices=SCALES)
    model.add_argument("--stdnorm", type=_bool, help="true/false (default: on for iln only)")
    model.add_argument("--affine-outer", type=_bool, help="true/false (default: on for iln only)")
    model.add_argument(
        "--in-chans", type=int, choices=(1, 3), help="1 for grey models (default: 3, RGB)"
    )
    model.add_argument("--key", default="params_ema", choices=("params_ema", "params"))
    sub.add_argument("--tile", type=int, default=0, help="LR tile size, 0 = whole image")
    sub.add_argument("--tile-overlap", type=int, default=16)
    sub.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sub.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
    sub.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        key: value
        for key, value in (
            ("stdnorm", args.stdnorm),
            ("affine_outer", args.affine_outer),
            ("in_chans", args.in_chans),
        )
        if value is not None
    }
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"iln restore: error: --device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        model = load_model(
            args.weights,
            device=device,
            arch=args.arch,
            norm=args.norm,
            scale=args.scale,
            overrides=overrides,
            key=args.key,
        )
        targets = output_paths(input_images(args.input), args.output)
    except (RestoreError, FileNotFoundError, ImageReadError, ValueError, RuntimeError) as err:
        print(f"iln restore: error: {err}", file=sys.stderr)
        return 2
    if args.tile and (args.tile < 0 or args.tile % model.window_size):
        print(
            f"iln restore: error: --tile must be a multiple of the model's window "
            f"({model.window_size}), got {args.tile}",
            file=sys.stderr,
        )
        return 2
    warning = fp16_warning(model, args.precision)
    if warning:
        print(f"iln restore: {warning}", file=sys.stderr)
    try:
        failures = restore_files(
            model,
            targets,
            device=device,
            precision=args.precision,
            tile=args.tile or None,
            tile_overlap=args.tile_overlap,
            on_failure=lambda f: tqdm.write(f"iln restore: skipped {f.message}", file=sys.stderr),
        )
    except RestoreError as err:
        print(f"iln restore: error: {err}", file=sys.stderr)
        return 2
    if failures:
        print(
            f"iln restore: {len(failures)} of {len(targets)} images failed (listed above)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
