"""Entry point shared by the stage scripts: expected failures end in one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from iln.config import ParamsError
from iln.data.archive import UnsafeArchiveError
from iln.data.download import DownloadError
from iln.data.io import ImageReadError
from iln.released import ReleasedWeightsError
from iln.train import TrainingDiverged

# Failures caused by the inputs (params, data, a diverging run), not by a bug: the message
# says what to fix, so a traceback would only hide it.
EXPECTED = (
    ParamsError,
    FileNotFoundError,
    ImageReadError,
    DownloadError,
    UnsafeArchiveError,
    TrainingDiverged,
    ReleasedWeightsError,
)


def run_stage(name: str, main: Callable[[], int]) -> int:
    """Run ``main``; an expected failure prints ``<name>: <message>`` and returns 1."""
    try:
        return main()
    except EXPECTED as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1


def project_root() -> Path:
    """The folder a stage reads and writes under: ``DVC_ROOT`` when DVC runs the stage,
    else the working directory."""
    return Path(os.environ.get("DVC_ROOT", Path.cwd()))
