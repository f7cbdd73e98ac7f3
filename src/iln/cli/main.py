"""The ``iln`` command (also ``python -m iln``): restore your own images with an image
restoration Transformer trained by this pipeline or released by the i-LN paper's authors.

    iln restore WEIGHTS INPUT OUTPUT [--arch A --norm N --scale S] [--chunked | --tile T]
                [--precision P]

restores one image or every image of a folder with a train-stage ``model.pt`` or a
BasicSR checkpoint (the authors' released weights), no ground truth needed.

    iln config configs/X.yaml [--params params.yaml] [--out PATH] [--stack]

writes params.yaml = the default params.yaml + the differences in an overlay
(``iln.config.overlay``), validated before it replaces anything.

    iln export NAME --format onnx|safetensors|basicsr|redux --out FILE
    iln import FILE --format safetensors|redux --out model.pt

write a run, a released entry or a weights file in another tool's format, and read such a
file back (``iln.export``).

    iln ui [--port N] [--host H]

starts the MLflow UI on the project's store and prints the address of LN against i-LN
(every grid member) on one chart page.

    iln smoke [--out DIR]

runs every stage of the pipeline on small data in a copy of the project (``iln.smoke``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iln import __version__
from iln.config.overlay import apply_file
from iln.config.params import check_tile
from iln.data.io import WRITE_FORMATS, ImageReadError
from iln.evaluation.batch_restore import (
    PRECISIONS,
    RestoreError,
    check_writable,
    fp16_warning,
    input_images,
    load_model,
    plan_outputs,
    restore_files,
    unusable_images,
)
from iln.models import ARCHS, NORMS, SCALES
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


RESTORE_EPILOG = """\
examples:
  iln restore runs/iln/train/model.pt photo.jpg photo_x2.png
  iln restore runs/iln/train/model.pt photos/ restored/ --tile 64 --threads 2
  iln restore LN.pth lr/ sr/ --arch hat_1 --norm ln --scale 4 --no-stdnorm
"""
EXPORT_EPILOG = """\
examples:
  iln export iln --format onnx --out iln.onnx
  iln export iln --format basicsr --out iln_official.pth   (their HAT_iLN)
  iln export LN.pth --arch hat_1 --norm ln --scale 4 --format safetensors \\
      --out ln.safetensors
"""
IMPORT_EPILOG = """\
examples:
  iln import ln.safetensors --format safetensors --out model.pt
  iln import net_g.pth --format redux --arch hat_1 --norm iln --out model.pt
"""
CONFIG_EPILOG = """\
examples:
  iln config configs/cpu_paper_recipe.yaml && dvc repro
  iln config configs/paper_hat1_x4.yaml --out /tmp/p.yaml   (look first)
  git checkout params.yaml                                  (the default again)
"""
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True}
BOOLEAN_WORDS |= {"false": False, "0": False, "no": False, "off": False}
SWITCHES = ("--stdnorm", "--affine-outer")  # --X / --no-X; the older --X BOOL still works


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help as wide as the terminal (at most 100 columns): paragraphs of the description and
    epilog are re-wrapped, indented lines (examples, lists) are kept as written."""

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size().columns, 100) - 2
        super().__init__(prog, width=width, max_help_position=min(30, width // 3))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        prose: list[str] = []
        for line in [*text.splitlines(), ""]:
            if line and not line.startswith(" "):
                prose.append(line)
                continue
            if prose:
                out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent,
                                         subsequent_indent=indent))  # fmt: skip
                prose = []
            out.append(indent + line if line else "")
        return "\n".join(out).rstrip("\n") + "\n"


def _old_booleans(argv: list[str]) -> list[str]:
    """``--stdnorm true`` / ``--stdnorm=false`` (the older spelling) as ``--stdnorm`` /
    ``--no-stdnorm``."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        name, equals, value = word.partition("=")
        if name in SWITCHES and equals:
            out.append(_switch(name, value))
        elif word in SWITCHES:
            following = next(words, None)
            if following is not None and following.lower() in BOOLEAN_WORDS:
                out.append(_switch(word, following))
            else:
                out += [word] if following is None else [word, following]
        else:
            out.append(word)
    return out


def _switch(name: str, value: str) -> str:
    on = BOOLEAN_WORDS.get(value.lower())
    if on is None:
        return f"{name}={value}"  # argparse refuses it, naming the option
    return name if on else f"--no-{name[2:]}"


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
    parser = _Parser(
        prog="iln",
        description=DESCRIPTION,
        epilog="examples:\n  iln restore runs/iln/train/model.pt photo.jpg photo_x2.png\n"
        "  iln config configs/cpu_paper_recipe.yaml && dvc repro\n  iln smoke",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"iln {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _restore_parser(commands)
    _config_parser(commands)
    _export_parser(commands)
    _ui_parser(commands)
    _smoke_parser(commands)
    return parser


def _restore_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "restore",
        help="restore an image or a folder of images into OUTPUT (iln restore --help)",
        description=RESTORE_DESCRIPTION % {"formats": ", ".join(WRITE_FORMATS)},
        epilog=RESTORE_EPILOG,
        formatter_class=_Formatter,
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
    _basicsr_options(sub)
    _compute_options(sub)


def _basicsr_options(sub: argparse.ArgumentParser) -> None:
    model = sub.add_argument_group(
        "BasicSR checkpoints", "what the file does not record (a model.pt records all of it)"
    )
    model.add_argument(
        "--arch", choices=ARCHS, metavar="A", help=f"network preset: {', '.join(ARCHS)}"
    )
    model.add_argument(
        "--norm",
        choices=NORMS,
        metavar="N",
        help=f"normalisation the network was trained with: {', '.join(NORMS)}",
    )
    model.add_argument("--scale", type=int, choices=SCALES, help="upscaling factor")
    model.add_argument(
        "--stdnorm",
        action=argparse.BooleanOptionalAction,
        help="rescale each residual branch by the image's std (default: on for iln only)",
    )
    model.add_argument(
        "--affine-outer",
        action=argparse.BooleanOptionalAction,
        help="the official i-LN's placement of the norm's affine (default: on for iln only)",
    )
    model.add_argument(
        "--in-chans", type=int, choices=(1, 3), help="1 for grey models (default: 3, RGB)"
    )
    model.add_argument(
        "--key",
        choices=("params_ema", "params"),
        help="which weights of the file to load: the EMA ones (default) or the trained ones",
    )


def _compute_options(sub: argparse.ArgumentParser) -> None:
    run = sub.add_argument_group("how the images are computed")
    run.add_argument(
        "--tile",
        type=_count,
        default=0,
        metavar="PX",
        help="tile size in input (LR) pixels, a multiple of the model's attention window, "
        "for images too large for memory; 0 (default) = the whole image at once. Inexact for "
        "models with whole-image statistics (i-LN, LN*, HAT's channel attention): each tile "
        "takes its own; --chunked is exact",
    )
    run.add_argument(
        "--chunked",
        action="store_true",
        help="exact whole-image inference at bounded memory: every whole-image statistic "
        "(i-LN's mean and variance, channel attention's pooling) over the whole image, the "
        "wide layers in pieces; equal to the whole image to float rounding, at a fraction of "
        "its memory (not automatic: off by default); excludes --tile",
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


def _config_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "config",
        help="apply a configs/*.yaml overlay to params.yaml (iln config --help)",
        description=CONFIG_DESCRIPTION,
        epilog=CONFIG_EPILOG,
        formatter_class=_Formatter,
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


def _smoke_parser(commands: argparse._SubParsersAction) -> None:
    from iln.smoke.cli import DESCRIPTION, EPILOG, add_arguments

    sub = commands.add_parser(
        "smoke",
        help="run every stage of the pipeline on small data in a copy of the project (CI)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    add_arguments(sub)


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


EXPORT_DESCRIPTION = """\
iln export NAME --format F --out FILE writes a model for other tools: NAME is a run or a
released entry of --params (opened as the evaluate stage opens it) or a weights file
(model.pt, a BasicSR .pth with --arch/--norm/--scale, an iln .safetensors). Formats:
  basicsr      the authors' layout (params_ema; i-LN norms gamma/beta)
  redux        traiNNer-redux hat_iln (.pth, params), our input encoding
               folded into its first and last convolutions
  safetensors  any model, its recipe and provenance in the metadata
  onnx         the whole restoration for onnxruntime: an RGB image (1, C, H, W)
               in [0, 1] of any size in, the restored image out
iln import FILE --format safetensors|redux --out model.pt reads such a file back as a
model.pt (iln restore, iln export read it). BasicSR files need no import: iln restore
reads them with --arch/--norm/--scale. Files are written atomically.
"""


def _export_parser(commands: argparse._SubParsersAction) -> None:
    from iln.export import FORMATS, IMPORT_FORMATS

    for name, formats in (("export", FORMATS), ("import", IMPORT_FORMATS)):
        sub = commands.add_parser(
            name,
            help=f"{name} a model {'to' if name == 'export' else 'from'} another tool's "
            f"format ({', '.join(formats)}; iln {name} --help)",
            description=EXPORT_DESCRIPTION,
            epilog=EXPORT_EPILOG if name == "export" else IMPORT_EPILOG,
            formatter_class=_Formatter,
        )
        sub.add_argument(
            "source",
            metavar="NAME" if name == "export" else "FILE",
            help="a run or released entry, or a weights file"
            if name == "export"
            else "the file to read",
        )
        sub.add_argument("--format", required=True, choices=formats, help="file format")
        sub.add_argument("--out", required=True, type=Path, metavar="FILE", help="file to write")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        sub.add_argument(
            "--arch",
            choices=ARCHS,
            metavar="A",
            help=f"preset of a BasicSR / redux file: {', '.join(ARCHS)}",
        )
        sub.add_argument(
            "--norm",
            choices=NORMS,
            metavar="N",
            help=f"norm of a BasicSR / redux file: {', '.join(NORMS)}",
        )
        sub.add_argument("--scale", type=int, choices=SCALES, help="scale of such a file")
        if name == "import":
            continue
        sub.add_argument("--params", type=Path, default=Path("params.yaml"), metavar="PATH")
        sub.add_argument(
            "--weights", choices=("ema", "raw"), default="ema", help="a run's weights (ema)"
        )
        sub.add_argument(
            "--precision", choices=("fp32", "fp16"), default="fp32", help="ONNX number format"
        )
        sub.add_argument(
            "--allow-border-difference",
            action="store_true",
            help="redux: write an RGB model although its mean shift changes the image border",
        )


def _export(args: argparse.Namespace) -> int:
    from iln.export import ExportError
    from iln.export.command import FileRecipe, export, import_file, open_named

    if args.out.exists() and not args.overwrite:
        return _error(f"{args.out} exists (--overwrite replaces it)", command=args.command)
    recipe = FileRecipe(arch=args.arch, norm=args.norm, scale=args.scale)
    try:
        if args.command == "import":
            print(f"iln import: {import_file(Path(args.source), args.format, args.out, recipe)}")
            return 0
        opened = open_named(args.source, args.params, args.weights, recipe)
        line = export(
            opened,
            args.format,
            args.out,
            precision=args.precision,
            allow_border=args.allow_border_difference,
        )
    except (ExportError, FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        return _error(str(err).splitlines()[0], command=args.command)
    print(f"iln export: {line}")
    return 0


UI_DESCRIPTION = """\
Start the MLflow UI on the project's store (mlflow.db in the project folder,
or the store MLFLOW_TRACKING_URI names) and print the one address that opens
the comparison: the parent run of every grid member (LN, i-LN, ...), one line
each in its norm's colour, on one chart page: training loss, validation PSNR,
the deepest group's feature magnitude on a log axis, its channel entropy, then
the final PSNR/SSIM. The view is saved in the experiment (MLflow's saved view
"iln-compare"), so the address works for anyone opening that store. With a
tracking server (MLFLOW_TRACKING_URI=http://...) no UI is started: the address
on that server is printed. Ctrl-C stops the UI.
"""
UI_EPILOG = """\
examples:
  iln ui                      # a free port of 127.0.0.1
  iln ui --port 5000
"""


def _ui_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "ui",
        help="start the MLflow UI and print the LN vs i-LN chart page (iln ui --help)",
        description=UI_DESCRIPTION,
        epilog=UI_EPILOG,
        formatter_class=_Formatter,
    )
    sub.add_argument("--port", type=_count, metavar="N", help="port (default: a free one)")
    sub.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    sub.add_argument("--params", default="params.yaml", metavar="PATH", help="names the experiment")


def _ui(args: argparse.Namespace) -> int:
    """``iln ui``: save the comparison view, start the UI, print its address, serve until
    Ctrl-C."""
    from iln import tracking
    from iln.cli.stage import store_root
    from iln.config.params import load_params

    root = store_root()
    try:
        experiment = load_params(args.params).tracking.experiment
        experiment_id = tracking.save_comparison_view(root, experiment)
    except (ValueError, RuntimeError, OSError) as err:  # ParamsError, TrackingError
        return _error(str(err), code=1, command="ui")
    uri = tracking.tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        print(tracking.comparison_link(uri.rstrip("/"), experiment_id))
        return 0
    port = args.port or tracking.free_port(args.host)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    address = f"http://{shown}:{port}"
    server = tracking.start_ui(root, args.host, port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the UI as Ctrl-C does
    try:
        tracking.wait_for_ui(address, server)
        print(f"iln ui: MLflow UI on {uri} at {address}; LN vs i-LN (Ctrl-C stops it):")
        print(tracking.comparison_link(address, experiment_id), flush=True)
        return server.wait()
    except tracking.TrackingError as err:
        return _error(str(err), code=1, command="ui")
    except KeyboardInterrupt:
        return 0
    finally:
        tracking.stop_ui(server)


def _error(message: str, code: int = 2, command: str = "restore") -> int:
    print(f"iln {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_old_booleans(sys.argv[1:] if argv is None else argv))
    if args.command == "config":
        return _config(args)
    if args.command in ("export", "import"):
        return _export(args)
    if args.command == "ui":
        return _ui(args)
    if args.command == "smoke":
        from iln.smoke.cli import smoke

        return smoke(args)
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
        unusable = unusable_images(args.input)  # named and counted as failed, never skipped
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
    if args.chunked and args.tile:
        return _error("--chunked (exact) and --tile (inexact) exclude each other; choose one")
    output = Path(args.output)
    single = len(targets) == 1 and next(iter(targets.values())) == output
    try:
        check_writable(output.parent if single else output)
    except RestoreError as err:
        return _error(str(err))
    warning = fp16_warning(model, args.precision)
    if warning:
        print(f"iln restore: {warning}", file=sys.stderr)
    for failure in unusable:
        print(f"iln restore: skipped {failure.message}", file=sys.stderr)
    try:
        outcome = restore_files(
            model,
            targets,
            device=device,
            precision=args.precision,
            tile=args.tile or None,
            tile_overlap=args.tile_overlap,
            chunked=args.chunked,
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
    failed = len(outcome.failures) + len(unusable)
    if failed:
        print(
            f"iln restore: {failed} of {len(targets) + len(unusable)} images failed (listed "
            f"above); {written} to {where}",
            file=sys.stderr,
        )
        return 1
    print(f"iln restore: {written} to {where}" if not single else f"iln restore: wrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
