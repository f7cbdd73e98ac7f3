"""Resumable training state on disk: the latest checkpoint and the one before it.

``checkpoint.pt`` is replaced atomically at every checkpoint; the file it replaces is kept
as ``checkpoint.prev.pt``. A checkpoint that cannot be read (a damaged disk, a file cut
short by hand) is skipped with one warning line, and training resumes from the previous
one, or restarts from step 0 when neither is usable. Only a checkpoint of the same
configuration (``iln.fingerprint``) is ever resumed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iln.files import atomic_path, write_json_atomic

CHECKPOINT_VERSION = 1


def previous_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_resume_state(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically to ``path``; the checkpoint it replaces becomes the
    previous one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, previous_path(path))


def load_resume_state(
    path: Path,
    fingerprint: str,
    *,
    max_step: int,
    warn: Callable[[str], None],
) -> dict[str, Any] | None:
    """The newest readable checkpoint of configuration ``fingerprint`` at a step <= ``max_step``
    (``path``, else its previous one), or None: start from step 0.

    Unreadable files produce one ``warn`` line that says what happens instead. A checkpoint
    of another configuration is not an error: it is ignored (and later overwritten).
    """
    path = Path(path)
    problems: list[str] = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors, ...
            problems.append(f"{candidate} is unreadable ({_first_line(err)})")
            continue
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            problems.append(f"{candidate} is not a checkpoint of this version")
            continue
        if state.get("fingerprint") != fingerprint or int(state.get("step", -1)) > max_step:
            continue  # another configuration, or a longer run: not ours to resume
        if problems:
            warn(f"{'; '.join(problems)}: resuming from {candidate} (step {state['step']})")
        return {**state, "loaded_from": str(candidate)}
    if problems:
        warn(f"{'; '.join(problems)}: no usable checkpoint of this run, training starts at step 0")
    return None


def _first_line(err: BaseException) -> str:
    """The error's first sentence (torch appends a paragraph of advice to its messages)."""
    text = str(err).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# The MLflow run a checkpoint's training logs to, so that a resumed training continues it.
TRACKING_FILE = "tracking.json"


def tracked_run(checkpoint: Path, fingerprint: str, store: str) -> str | None:
    """The id of the tracked run that wrote ``checkpoint`` (or the one kept before it), when
    the checkpoint is of configuration ``fingerprint`` and was tracked in ``store``."""
    checkpoint = Path(checkpoint)
    if not (checkpoint.exists() or previous_path(checkpoint).exists()):
        return None
    try:
        record = json.loads((checkpoint.parent / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None  # none yet, or damaged: a new tracked run
    if not isinstance(record, dict):
        return None
    if record.get("fingerprint") != fingerprint or record.get("store") != store:
        return None
    return record.get("run_id") if isinstance(record.get("run_id"), str) else None


def remember_tracked_run(checkpoint: Path, fingerprint: str, store: str, run_id: str) -> None:
    write_json_atomic(
        Path(checkpoint).parent / TRACKING_FILE,
        {"fingerprint": fingerprint, "store": store, "run_id": run_id},
    )
