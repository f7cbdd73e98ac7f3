"""DVC stage `download`: fetch the datasets listed in `data.datasets` into data/hr/<set>/.

    python stages/download.py [--params params.yaml]

The default (`datasets: [default]`) copies the embedded photographs and needs no network.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from iln.config import parse
from iln.data.download import DownloadError
from iln.data.params import DataParams
from iln.data.prepare import Sources, prepare_sets
from iln.layout import Layout


def load_section(path: Path, cls: type, key: str):
    """Only this stage's section, so the stage does not depend on unrelated params."""
    raw = yaml.safe_load(path.read_text()) or {}
    if key not in raw:
        raise SystemExit(f"{path}: missing section '{key}:'")
    return parse(cls, raw[key], key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    root = Path(os.environ.get("DVC_ROOT", Path.cwd()))
    params: DataParams = load_section(Path(args.params), DataParams, "data")
    sources = Sources(
        embedded_dir=root / params.embedded_dir,
        download_dir=root / params.download_dir,
        checksum_file=root / params.checksums,
        local={name: root / path for name, path in params.local.items()},
    )
    try:
        prepare_sets(params.datasets, Layout(root).hr, sources, workers=params.workers,
                     progress=not args.no_progress and sys.stderr.isatty())
    except (DownloadError, FileNotFoundError, ValueError) as err:
        print(f"download: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
