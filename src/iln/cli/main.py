"""The ``iln`` command (also ``python -m iln``): restore your own images with an image
restoration Transformer trained by this pipeline or released by the i-LN paper's authors.

    iln restore WEIGHTS INPUT OUTPUT [--arch A --norm N --scale S] [--tile T] [--precision P]

restores one image or every image of a folder with a train-stage ``model.pt`` or a
BasicSR checkpoint (the authors' released weights), no ground truth needed.

    iln config configs/X.yaml [--params params.yaml] [--out PATH] [--stack]

writes params.yaml = the default params.yaml + the differences in an overlay
(``iln.config.overlay``), validated before it replaces anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iln.config.params import check_tile
from iln.data.io import WRITE_FORMATS, ImageReadError
from iln.models import ARCHS, NORMS, SCALES
from iln.config.overlay import apply_file
from iln.evaluation.batch_restore import (
    PRECISIONS,
    RestoreError,
    check_writable,
    fp16_warning,
    input_images,
    load_model,
    plan_outputs,
    restore_files,
)
from iln.util.device import resolve_device

DESCRIPTION = (
    "Restore images (super-resolution, denoising, ...) with an image restoration Transformer "
    "(HAT, SwinIR, ...) trained by this pipeline or released by the i-LN paper's authors; "
    "select a ready grid of configs/ for the pipeline."
)
CONFIG_DESCRIPTION = """\
Write PARAMS (default params.yaml) = PARAMS + the differences in OVERLAY, a configs/*.yaml
file: nested sections merge key by key, except the grids runs: and released:, which the
overlay replaces whole; lists and values replace. The result is validated before PARAMS
is replaced (atomically): a bad overlay leaves it byte-identical. Its first lines name the
overlay and how to go back (git checkout params.yaml); the keys the overlay sets are
rewritten without comments, the rest keeps its own. A PARAMS already composed from an
overlay is refused (each overlay means the default + its differences) unless --stack.
Then: dvc repro.
"""
RESTORE_DESCRIPTION = """\
Restore INPUT (an image, or every image directly in a folder) with WEIGHTS and write the
results to OUTPUT, without ground truth.

OUTPUT is a folder of PNGs named after the inputs (a.jpg -> a.png; inputs sharing a name,
such as a.jpg and a.png, keep their suffix: a.jpg.png, a.png.png), or, for a single input,
an image file whose suffix picks the format:
  %(formats)s
Nothing is computed if any planned output is one of the input images (refused whatever
the options), an existing folder, the output of two inputs, or an existing file (refused
unless --overwrite), or if OUTPUT's folder cannot be written. Each file is written
atomically; Ctrl-C stops with no partial file. Photos are turned upright as their EXIF
orientation says, as image viewers show them. The last line names where the outputs are.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line (the usage is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _threads(text: str) -> int:
    cores = os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if not 1 <= value <= 4 * cores:
        raise argparse.ArgumentTypeError(
            f"expected 1 to {4 * cores} CPU threads (4 x the {cores} cores here), got {value}"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iln", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser(
        "restore",
        help="restore an image or a folder of images into OUTPUT (iln restore --help)",
        description=RESTORE_DESCRIPTION % {"formats": ", ".join(WRITE_FORMATS)},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument(
        "weights",
        metavar="WEIGHTS",
        help="model.pt written by the train stage, or a BasicSR checkpoint (.pth)",
    )
    sub.add_argument(
        "input", metavar="INPUT", help="an image file, or a folder whose images are all restored"
    )
    sub.add_argument(
        "output",
        metavar="OUTPUT",
        help="output folder (created if needed), or an image file for a single input",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (never an input image)",
    )
    model = sub.add_argument_group(
        "BasicSR checkpoints", "what the file does not record (a model.pt records all of it)"
    )
    model.add_argument("--arch", choices=ARCHS, help="network preset")
    model.add_argument("--norm", choices=NORMS, help="normalisation the network was trained with")
    model.add_argument("--scale", type=int, choices=SCALES, help="upscaling factor")
    model.add_argument(
        "--stdnorm", type=_bool, metavar="BOOL", help="true/false (default: on for iln only)"
    )
    model.add_argument(
        "--affine-outer", type=_bool, metavar="BOOL", help="true/false (default: on for iln only)"
    )
    model.add_argument(
        "--in-chans", type=int, choices=(1, 3), help="1 for grey models (default: 3, RGB)"
    )
    model.add_argument(
        "--key",
        choices=("params_ema", "params"),
        help="which weights of the file to load: the EMA ones (default) or the trained ones",
    )
    run = sub.add_argument_group("how the images are computed")
    run.add_argument(
        "--tile",
        type=_count,
        default=0,
        metavar="PX",
        help="tile size in input (LR) pixels, a multiple of the model's attention window, "
        "for images too large for memory; 0 (default) = the whole image at once",
    )
    run.add_argument(
        "--tile-overlap",
        type=_count,
        default=16,
        metavar="PX",
        help="overlap of neighbouring tiles in input (LR) pixels, averaged in the output; "
        "less than --tile (default 16)",
    )
    run.add_argument(
        "--device", default="auto", metavar="D", help="auto (default), cpu, cuda or cuda:N"
    )
    run.add_argument(
        "--precision",
        default="fp32",
        choices=tuple(PRECISIONS),
        help="number format of the forward pass (default fp32; per-token LN models can "
        "overflow in fp16)",
    )
    run.add_argument(
        "--threads",
        type=_threads,
        metavar="N",
        help=f"CPU threads of torch, 1 to {4 * (os.cpu_count() or 1)} (default: torch's choice)",
    )
    _config_parser(commands)
    return parser


def _config_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "config",
        help="apply a configs/*.yaml overlay to params.yaml (iln config --help)",
        description=CONFIG_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("overlay", metavar="OVERLAY", help="a configs/*.yaml file")
    sub.add_argument(
        "--params", default="params.yaml", metavar="PATH", help="the base (default params.yaml)"
    )
    sub.add_argument("--out", metavar="PATH", help="write the result here instead of over --params")
    sub.add_argument(
        "--stack",
        action="store_true",
        help="apply onto a params file that is already composed from an overlay",
    )


def _config(args: argparse.Namespace) -> int:
    out = args.out or args.params
    try:
        sections = apply_file(args.overlay, args.params, out, stack=args.stack)
    except (ValueError, OSError) as err:  # ParamsError, OverlayError, DiskFullError, ...
        return _error(str(err), command="config")
    print(
        f"iln config: wrote {out} = {args.params} + {args.overlay} (sections set: "
        f"{', '.join(sections)}); back to the default: git checkout {args.params}"
    )
    return 0


def _error(message: str, code: int = 2, command: str = "restore") -> int:
    print(f"iln {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        return _config(args)
    try:
        return _restore(args)
    except KeyboardInterrupt:
        print("iln restore: interrupted; no image was written", file=sys.stderr)
        return 130


def _restore(args: argparse.Namespace) -> int:
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
        return _error(f"--device {args.device}: no CUDA device here")
    try:
        targets = plan_outputs(input_images(args.input), args.output, overwrite=args.overwrite)
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
    except (RestoreError, FileNotFoundError, ImageReadError, ValueError, RuntimeError) as err:
        return _error(str(err))
    try:
        check_tile(
            args.tile, args.tile_overlap, model.window_size, keys=("--tile", "--tile-overlap")
        )
    except ValueError as err:
        return _error(str(err))
    output = Path(args.output)
    single = len(targets) == 1 and next(iter(targets.values())) == output
    try:
        check_writable(output.parent if single else output)
    except RestoreError as err:
        return _error(str(err))
    warning = fp16_warning(model, args.precision)
    if warning:
        print(f"iln restore: {warning}", file=sys.stderr)
    try:
        outcome = restore_files(
            model,
            targets,
            device=device,
            precision=args.precision,
            tile=args.tile or None,
            tile_overlap=args.tile_overlap,
            on_failure=lambda f: tqdm.write(f"iln restore: skipped {f.message}", file=sys.stderr),
        )
    except RestoreError as err:
        return _error(str(err))
    written = f"{len(outcome.written)} of {len(targets)} images written"
    where = output if single else f"{output}{os.sep}"
    if outcome.interrupted:
        print(f"iln restore: interrupted; {written} to {where}, no partial file", file=sys.stderr)
        return 130
    if outcome.stopped:
        return _error(f"{outcome.stopped}; stopped: {written} to {where}", code=1)
    if outcome.failures:
        print(
            f"iln restore: {len(outcome.failures)} of {len(targets)} images failed (listed "
            f"above); {written} to {where}",
            file=sys.stderr,
        )
        return 1
    print(f"iln restore: {written} to {where}" if not single else f"iln restore: wrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
