"""Memory and time of exact chunked inference against the whole image and tiles.

Usage (from the repository root, with ``src`` on the path)::

    python -m benchmarks.chunked [--preset hat_1] [--norm iln] [--sizes 256 512 1024 2048]
                                 [--tile 128] [--tile-overlap 16] [--threads 1] [--out FILE]

For every LR side S and every mode (``whole``: ``model(x)``; ``chunked``:
``iln.models.chunked.chunked_forward``; ``tiled``: the inexact tiles of ``evaluate.tile``)
one child process builds the model (seeded random weights), makes a seeded S x S image in
[0, 1], runs one forward pass and reports its wall time and memory, and writes the output
to a temporary file; the parent reports the largest absolute difference of each output
from the whole-image output of the same S (n/a where the whole image failed).

Memory: on the CPU the growth of the child's peak RSS (``resource.getrusage``) over the
forward pass, measured after the model and the input exist; RSS counts pages, so memory
the C allocator took earlier and reused is not counted and memory it keeps after a free
is. On CUDA, ``torch.cuda.max_memory_allocated`` over the forward pass (tensor memory).
A child that fails (out of memory, a limit) is reported with its last error line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iln.evaluation.inference import _forward_tiled
from iln.models import ARCHS, build_model
from iln.models.chunked import chunked_forward
from iln.util.files import write_json_atomic, write_text_atomic

MODES = ("whole", "chunked", "tiled")


def _child(args: argparse.Namespace) -> None:
    import resource

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(
        args.preset, norm=args.norm, scale=args.scale, generator=torch.Generator().manual_seed(0)
    )
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, args.size, args.size, generator=g).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.max_memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.inference_mode():
        if args.mode == "whole":
            y = model(x)
        elif args.mode == "chunked":
            y = chunked_forward(model, x)
        else:
            y = _forward_tiled(model, x, args.scale, args.tile, args.tile_overlap)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    np.save(args.save, y.float().cpu().numpy())
    print(json.dumps({"seconds": seconds, "peak_growth": peak - base, "peak": peak}))


def _run_case(args: argparse.Namespace, size: int, mode: str, save: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.chunked", "--child", "--mode", mode,
           "--size", str(size), "--save", str(save), "--preset", args.preset,
           "--norm", args.norm, "--scale", str(args.scale), "--tile", str(args.tile),
           "--tile-overlap", str(args.tile_overlap), "--threads", str(args.threads),
           "--device", args.device]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()
        return {"size": size, "mode": mode, "error": lines[-1]}
    return {"size": size, "mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    memory = "peak RSS growth" if args.device == "cpu" else "max_memory_allocated"
    lines = [
        f"{args.preset} {args.norm} x{args.scale}, {args.device}, {args.threads} thread(s), "
        f"tiles {args.tile} px / overlap {args.tile_overlap}",
        "",
        f"| LR side | mode | time (s) | {memory} (MiB) | max abs diff from whole |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | failed: {r['error'][:80]} | | |")
            continue
        diff = "n/a" if r["diff"] is None else f"{r['diff']:.2e}"
        mib = r["peak_growth"] / 2**20
        lines.append(f"| {r['size']} | {r['mode']} | {r['seconds']:.1f} | {mib:.0f} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hat_1", choices=ARCHS)
    parser.add_argument("--norm", default="iln")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--tile", type=int, default=128, help="LR tile side of the tiled mode")
    parser.add_argument("--tile-overlap", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the rows (JSON) and table (.md)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            outputs = {}
            for mode in args.modes:
                save = Path(tmp) / f"{size}_{mode}.npy"
                row = _run_case(args, size, mode, save)
                if "error" not in row:
                    outputs[mode] = save
                rows.append(row)
            whole = np.load(outputs["whole"]) if "whole" in outputs else None
            for row in rows[-len(args.modes) :]:
                if "error" in row:
                    continue
                out = np.load(outputs[row["mode"]])
                row["diff"] = None if whole is None else float(np.abs(out - whole).max())
                print(json.dumps(row), flush=True)
            for path in outputs.values():
                path.unlink()
    table = _table(rows, args)
    print(table)
    if args.out is not None:
        settings = {k: v for k, v in vars(args).items() if k in ("preset", "norm", "scale",
                    "tile", "tile_overlap", "threads", "device")}  # fmt: skip
        write_json_atomic(args.out, {"settings": settings, "rows": rows})
        write_text_atomic(args.out.with_suffix(".md"), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
