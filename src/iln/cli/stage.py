"""Entry point shared by the stage scripts: expected failures end in one clear line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

# Failures caused by the inputs (params, data, a damaged file, a full disk, a diverging run),
# not by a bug: the library raises them with a message that says what to fix, so a traceback
# would only hide it. Every such error of the library is a ValueError (ParamsError,
# ImageReadError, UnsafeArchiveError, ...), a RuntimeError (DownloadError, TrainingDiverged,
# no CUDA device, ...) or an OSError (a missing file, DiskFullError). ILN_TRACEBACK=1 shows
# the traceback as well, for reporting a bug.
EXPECTED = (ValueError, RuntimeError, OSError)


def run_stage(name: str, main: Callable[[], int]) -> int:
    """Run ``main``; an expected failure prints ``<name>: error: <message>`` and returns 1."""
    try:
        return main()
    except EXPECTED as err:
        if os.environ.get("ILN_TRACEBACK"):
            raise
        notes = getattr(err, "__notes__", [])  # what else happened meanwhile (add_note)
        message = " ".join([str(err), *(f"({note})" for note in notes)]).split()
        message = " ".join(message) or type(err).__name__  # one line
        print(f"{name}: error: {message}", file=sys.stderr)
        return 1


def warn(name: str, message: str) -> None:
    """One warning line on stderr, prefixed by the stage name."""
    print(f"{name}: warning: {' '.join(message.split())}", file=sys.stderr)


def project_root() -> Path:
    """The folder a stage reads and writes under: the working directory, where DVC runs
    every stage of this project (``dvc.yaml`` is at the root). For ``dvc exp run --temp``
    and queued experiments that is the experiment's own copy of the project, never the
    workspace (which ``DVC_ROOT`` names then)."""
    return Path.cwd()


def store_root() -> Path:
    """The folder whose ``mlflow.db`` is the default MLflow store: the repository DVC runs
    the experiment for (``DVC_ROOT``: the workspace, also for an experiment run in a copy
    of it, so that every experiment lands in one store), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())
