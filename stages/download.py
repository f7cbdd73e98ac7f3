"""DVC stage `download`: fetch the datasets listed in `data.datasets` into data/hr/<set>/.

    python stages/download.py [--params params.yaml]

The default (`datasets: [default]`) copies the embedded photographs and needs no network.
"""

from __future__ import annotations

import argparse
import sys

from iln.cli.stage import project_root, run_stage
from iln.config.params import load_params
from iln.data.prepare import Sources, prepare_sets
from iln.util.files import remove_stale_temps
from iln.config.layout import Layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    root = project_root()
    params = load_params(
        args.params
    ).data  # the whole file is validated: a bad key anywhere stops here
    remove_stale_temps(Layout(root).hr)  # kill -9 leftovers (set folders are staged whole)
    remove_stale_temps((root / params.checksums).parent)
    sources = Sources(
        embedded_dir=root / params.embedded_dir,
        download_dir=root / params.download_dir,
        checksum_file=root / params.checksums,
        local={name: root / path for name, path in params.local.items()},
        extract_limits=params.extract.limits(),
    )
    prepare_sets(
        params.datasets,
        Layout(root).hr,
        sources,
        workers=params.workers,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("download", main))
