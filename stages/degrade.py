"""DVC stage `degrade`: (lq, gt) pairs data/pairs/<task>/<set>/{lq,gt}/ and
data/pairs/manifest.json.

python stages/degrade.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys

from iln.cli.stage import project_root, run_stage
from iln.config.params import load_params
from iln.data.pairs import make_pairs
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
    ).degrade  # the whole file is validated: a bad key anywhere stops here
    layout = Layout(root)
    remove_stale_temps(layout.pairs)  # kill -9 leftovers (pair folders are staged whole)
    make_pairs(
        params, layout.hr, layout.pairs, progress=not args.no_progress and sys.stderr.isatty()
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("degrade", main))
