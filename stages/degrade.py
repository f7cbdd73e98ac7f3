"""DVC stage `degrade`: (lq, gt) pairs data/pairs/<task>/<set>/{lq,gt}/ and data/pairs/manifest.json.

    python stages/degrade.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from iln.config import parse
from iln.data.pairs import make_pairs
from iln.data.params import DegradeParams
from iln.layout import Layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    root = Path(os.environ.get("DVC_ROOT", Path.cwd()))
    raw = yaml.safe_load(Path(args.params).read_text()) or {}
    if "degrade" not in raw:
        print(f"{args.params}: missing section 'degrade:'", file=sys.stderr)
        return 1
    params: DegradeParams = parse(DegradeParams, raw["degrade"], "degrade")
    layout = Layout(root)
    try:
        make_pairs(params, layout.hr, layout.pairs, progress=not args.no_progress and sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as err:
        print(f"degrade: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
