"""DVC stage `check_released@NAME`: checks and records the weights file of a `released:` entry.

The file must exist inside the project and fit the declared model; its SHA-256 is recorded in
the weights book once it has loaded, and runs/NAME/weights.json is written.

    python stages/check_released.py [--params params.yaml] -- NAME

It runs before the entry's evaluate/analyze stages so that a missing file is reported with
where to get it (DVC itself would only say that a dependency is missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from iln.cli.stage import project_root, run_stage
from iln.config.params import ParamsError, load_params
from iln.util.files import write_json_atomic
from iln.config.layout import Layout
from iln.weights.released import CATALOGUE, open_released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="entry under `released:` in the params file")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.name not in params.released:
        declared = ", ".join(params.released) or "none"
        raise ParamsError(f"released.{args.name}: no such entry (declared: {declared})")
    spec = params.released[args.name]
    layout = Layout(project_root())
    model, record = open_released(
        spec, args.name, root=layout.root, book=layout.weights_book, device="cpu"
    )
    entry = CATALOGUE.get(Path(record.file).name)
    write_json_atomic(
        layout.released_record(args.name),
        {
            **record.as_dict(),
            "model": model.hparams,
            "parameters": sum(p.numel() for p in model.parameters()),
            "release": entry.member if entry else None,
        },
    )
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_stage("check_released", main))
