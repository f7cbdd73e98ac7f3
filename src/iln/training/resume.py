"""Resumable training state on disk: the latest checkpoint and the one before it.

``checkpoint.pt`` is replaced atomically at every checkpoint; the file it replaces is kept
as ``checkpoint.prev.pt``. A checkpoint that cannot be read (a damaged disk, a file cut
short by hand) is skipped with one warning line, and training resumes from the previous
one, or restarts from step 0 when neither is usable. Only a checkpoint of the same
configuration (``iln.training.fingerprint``) is ever resumed.

A shorter run of the same configuration (``iterations`` lowered) never destroys what a
longer one reached: before it writes over a checkpoint of its own configuration at a later
step, that file is moved aside to ``checkpoint.step<N>.pt``. A run resumes from the latest
step it may (at most its ``iterations``) among all these files, so 20 -> 5 -> 20 iterations
resumes the last run at step 20. A kept file is removed once the same configuration writes
a checkpoint at its step or later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iln.util.files import atomic_path

CHECKPOINT_VERSION = 1


def previous_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def kept_path(path: Path, step: int) -> Path:
    """Where a checkpoint of a longer run is kept: ``checkpoint.pt`` -> ``checkpoint.step20.pt``."""
    return path.with_name(f"{path.stem}.step{step}{path.suffix}")


def _kept(path: Path) -> list[tuple[int, Path]]:
    """The kept checkpoints beside ``path``, latest step first."""
    pattern = re.compile(rf"^{re.escape(path.stem)}\.step(\d+){re.escape(path.suffix)}$")
    found = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match:
                found.append((int(match[1]), entry))
    return sorted(found, reverse=True)


def _peek(path: Path) -> tuple[str | None, int] | None:
    """(fingerprint, step) of a checkpoint file, without reading its tensors; None when it
    is missing or unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        return None
    try:
        return state.get("fingerprint"), int(state.get("step", -1))
    except (TypeError, ValueError):
        return None


def save_resume_state(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically to ``path``; the checkpoint it replaces becomes the
    previous one. Checkpoints of the same configuration at a later step (a longer run's)
    are moved aside first (``kept_path``), and kept ones this step reaches are removed."""
    path = Path(path)
    fingerprint, step = state.get("fingerprint"), int(state["step"])
    for candidate in (path, previous_path(path)):
        seen = _peek(candidate) if candidate.exists() else None
        if seen is not None and seen[0] == fingerprint and seen[1] > step:
            os.replace(candidate, kept_path(path, seen[1]))
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, previous_path(path))
    for kept_step, kept in _kept(path):
        if kept_step <= step and _peek(kept) is not None and _peek(kept)[0] == fingerprint:
            kept.unlink(missing_ok=True)


def load_resume_state(
    path: Path,
    fingerprint: str,
    *,
    max_step: int,
    warn: Callable[[str], None],
) -> dict[str, Any] | None:
    """The readable checkpoint of configuration ``fingerprint`` at the latest step <=
    ``max_step`` (``path``, its previous one, or one kept from a longer run), or None:
    start from step 0.

    Unreadable files produce one ``warn`` line that says what happens instead. A checkpoint
    of another configuration is not an error: it is ignored (and later overwritten).
    """
    path = Path(path)
    problems: list[str] = []
    best: tuple[int, Path] | None = None
    candidates = [path, previous_path(path), *(kept for _, kept in _kept(path))]
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors, ...
            problems.append(f"{candidate} is unreadable ({_first_line(err)})")
            continue
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            problems.append(f"{candidate} is not a checkpoint of this version")
            continue
        step = int(state.get("step", -1))
        if state.get("fingerprint") != fingerprint or step > max_step:
            continue  # another configuration, or a longer run: not ours to resume
        if best is None or step > best[0]:
            best = (step, candidate)
    if best is None:
        if problems:
            restart = "no usable checkpoint of this run, training starts at step 0"
            warn(f"{'; '.join(problems)}: {restart}")
        return None
    step, chosen = best
    state = torch.load(chosen, map_location="cpu", weights_only=True)
    if problems:
        warn(f"{'; '.join(problems)}: resuming from {chosen} (step {step})")
    return {**state, "loaded_from": str(chosen)}


def _first_line(err: BaseException) -> str:
    """The error's first sentence (torch appends a paragraph of advice to its messages)."""
    text = str(err).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
