"""Config overlays: a ``configs/*.yaml`` file holds only what differs from params.yaml.

``compose(base, overlay)`` merges an overlay into the default params: nested mappings merge
key by key, except the grid tables ``runs:`` and ``released:``, which an overlay replaces
whole (an overlay's runs are the runs); lists and scalars replace. ``apply_file`` writes
the composed params file, validated with ``iln.config.params.load_params`` before it replaces
anything, and records at its top which overlay made it, so that a second overlay is not
stacked on the first by accident (each overlay means "the default + these differences").

Not DVC-native: ``dvc exp run -S`` takes values, not files, and DVC's Hydra composition
runs only under ``dvc exp run`` (never for plain ``dvc repro``), regenerates params.yaml
from a ``conf/`` tree and merges every mapping, a grid included (docs/experiments.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from iln.config.params import ParamsError, load_params, read_yaml
from iln.util.files import atomic_path

GRIDS = ("runs", "released")  # top-level tables an overlay replaces whole
MARKER = "# iln config: "  # first line of a composed file: the overlays it holds, " + "-joined


class OverlayError(ValueError):
    """An overlay cannot be applied; the message names the file (and the key)."""


def compose(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in; neither is modified. A key the base lacks is
    added (``iln.config.params.load_params`` then decides whether the schema has it)."""
    out = _merge(base, overlay)
    for key in GRIDS:
        if key in overlay:
            out[key] = overlay[key]
    return out


def _merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def applied(text: str) -> list[str]:
    """The overlays a params file was composed from (its first line), [] for none."""
    first = text.split("\n", 1)[0]
    return first[len(MARKER) :].split(" + ") if first.startswith(MARKER) else []


def render(
    base_text: str, overlay: Mapping[str, Any], *, names: list[str], notes: str, back: str
) -> str:
    """The text of the params file composed from ``base_text`` and ``overlay``.

    A header names the overlays (``names``) and how to go back (``back``: the params file's
    name for git checkout), followed by ``notes`` (the overlay's own leading comments). The
    keys the overlay sets (a whole grid, a whole section the base writes in one line, else
    the second-level keys) are rewritten without comments, each under a ``# set by the
    overlay`` line; the rest keeps its text. A piece that would not read back as the
    composed value is rewritten whole, and if the file still would not (an anchor used
    across sections, say), every section is."""
    base = yaml.safe_load(base_text)
    composed = compose(base, overlay)
    _, sections = _sections(base_text, 0)
    body = "".join(
        _section(key, text, base[key], overlay[key], composed[key]) if key in overlay else text
        for key, text in sections
    )
    body += "".join(_dump(key, composed[key], 0) for key in overlay if key not in dict(sections))
    lost = "The keys the overlay sets are rewritten without"
    if not _reads_as(body, composed):
        body = "".join(_dump(key, value, 0) for key, value in composed.items())
        lost = "Every section is rewritten without"
    header = [
        f"{MARKER}{' + '.join(names)}",
        f"# The default {back} with the differences in {' + '.join(names)}, written by",
        f"# `iln config`; back to the default: git checkout {back}",
        f"# {lost} comments (every key: docs/parameters.md).",
    ]
    if notes:
        header += ["#", *notes.splitlines()]
    return "\n".join(header) + "\n\n" + body


def _section(key: str, text: str, base: Any, overlay: Any, composed: Any) -> str:
    """A top-level section with the second-level keys the overlay sets rewritten."""
    if key not in GRIDS and isinstance(base, Mapping) and isinstance(overlay, Mapping):
        head, _, rest = text.partition("\n")
        preamble, subs = _sections(rest, 2)
        new = head + "\n" + preamble
        new += "".join(_dump(k, composed[k], 2, text=t) if k in overlay else t for k, t in subs)
        new += "".join(_dump(k, composed[k], 2) for k in overlay if k not in dict(subs))
        if _reads_as(new, {key: composed}):
            return new
    return _dump(key, composed, 0, text=text)


def _sections(text: str, indent: int) -> tuple[str, list[tuple[str, str]]]:
    """The lines before the first key at ``indent`` spaces, and (key, text) per such key."""
    pattern = re.compile(rf"^ {{{indent}}}([A-Za-z_][\w-]*):")
    preamble: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines(keepends=True):
        match = pattern.match(line)
        if match:
            sections.append((match.group(1), [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            preamble.append(line)
    return "".join(preamble), [(key, "".join(lines)) for key, lines in sections]


def _dump(key: str, value: Any, indent: int, text: str = "\n") -> str:
    """``key: value`` as YAML at ``indent``, under a marker line, followed by the blank
    lines that ended ``text`` (the piece it replaces)."""
    pad = " " * indent
    name = _yaml(key)[0]
    lines = _yaml(value)
    if len(lines) == 1:  # a value or a collection of values, in one line
        entry = [f"{pad}{name}: {lines[0]}"]
    else:
        entry = [f"{pad}{name}:", *(f"{pad}  {line}" for line in lines)]
    blank = len(text) - len(text.rstrip("\n")) - 1
    return "\n".join([f"{pad}# set by the overlay", *entry]) + "\n" * (1 + max(blank, 0))


def _yaml(value: Any) -> list[str]:
    """The lines of ``value`` in YAML: collections of plain values in flow style."""
    text = yaml.safe_dump(
        value, sort_keys=False, default_flow_style=None, width=100, allow_unicode=True
    )
    return text.removesuffix("...\n").splitlines()  # a plain scalar ends the document


def _reads_as(text: str, value: Any) -> bool:
    """``text`` parses to ``value``, key order and number types included (the order of
    ``runs:`` is the order DVC trains them in)."""
    try:
        return repr(yaml.safe_load(text)) == repr(value)
    except yaml.YAMLError:
        return False


def _leading_comments(text: str) -> str:
    """The comment lines at the top of a YAML file (an overlay's description)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def apply_file(
    overlay_path: str | Path,
    params_path: str | Path,
    out_path: str | Path | None = None,
    *,
    stack: bool = False,
) -> list[str]:
    """Write ``out_path`` (default ``params_path``) = compose(params, overlay), validated
    before it replaces anything: on any error ``out_path`` is left as it was. Returns the
    top-level sections the overlay sets. Refuses a params file already composed from an
    overlay unless ``stack``."""
    overlay_path, params_path = Path(overlay_path), Path(params_path)
    out_path = Path(out_path) if out_path is not None else params_path
    load_params(params_path)  # a bad base is named as such, not blamed on the overlay
    base_text = params_path.read_text()
    before = applied(base_text)
    if before and not stack:
        raise OverlayError(
            f"{params_path}: already composed from {' + '.join(before)}; go back to the default "
            f"(git checkout {params_path}) before applying {overlay_path}, or pass --stack to "
            f"add it on top"
        )
    if not overlay_path.is_file():
        raise OverlayError(f"{overlay_path}: no such overlay file (the ready ones: configs/*.yaml)")
    overlay = read_yaml(overlay_path)
    if not isinstance(overlay, Mapping) or not overlay:
        raise OverlayError(
            f"{overlay_path}: expected a mapping of params.yaml sections holding what differs "
            f"from the default, got {type(overlay).__name__} {overlay!r}"
        )
    text = render(
        base_text,
        overlay,
        names=[*before, overlay_path.as_posix()],
        notes=_leading_comments(overlay_path.read_text()),
        back=params_path.as_posix(),
    )
    with atomic_path(out_path) as tmp:
        tmp.write_text(text)
        try:
            load_params(tmp)
        except ParamsError as err:
            detail = str(err).removeprefix(f"{tmp}: ")
            raise OverlayError(f"{overlay_path}: {detail} ({out_path} left unchanged)") from None
    return list(overlay)
