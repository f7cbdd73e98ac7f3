"""The paper's numbers (src/iln/paper_numbers.yaml): loading and strict validation."""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path

import yaml

PAPER_FILE = "paper_numbers.yaml"


def _check_numbers(node: object, where: str) -> None:
    """Every leaf below a results block must be a real number (not a YAML-1.1 string)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            _check_numbers(value, f"{where}.{key}")
    elif isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ValueError(f"{where}: expected a number, got {type(node).__name__} {node!r}")


def _require(mapping: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> object:
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise ValueError(f"{where}.{key}: expected {kind}, got {type(value).__name__} {value!r}")
    return value


def validate_paper_numbers(data: object, origin: str = PAPER_FILE) -> dict:
    """Check the structure; raise ValueError naming the file and key on anything unexpected."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin}: expected a mapping at the top level")
    _require(data, "paper", str, origin)
    tables = _require(data, "tables", Mapping, origin)
    for name, table in tables.items():
        where = f"{origin}: tables.{name}"
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        unknown = set(table) - {"title", "source", "setting", "results", "rows"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        _require(table, "title", str, where)
        _require(table, "source", str, where)
        if ("results" in table) == ("rows" in table):
            raise ValueError(f"{where}: needs exactly one of 'results' or 'rows'")
        if "results" in table:
            _check_numbers(_require(table, "results", Mapping, where), f"{where}.results")
        else:
            rows = _require(table, "rows", list, where)
            for i, row in enumerate(rows):
                rw = f"{where}.rows[{i}]"
                if not isinstance(row, Mapping):
                    raise ValueError(f"{rw}: expected a mapping")
                _require(row, "task", str, rw)
                _require(row, "set", str, rw)
                for key in ("arch", "note"):
                    if key in row and not isinstance(row[key], str):
                        raise ValueError(f"{rw}.{key}: expected a string")
                norms = {k: v for k, v in row.items() if k not in ("task", "set", "arch", "note")}
                if not norms:
                    raise ValueError(f"{rw}: no results (expected e.g. ln: {{psnr: ..}})")
                _check_numbers(norms, rw)
    if "features" in data:
        features = _require(data, "features", Mapping, origin)
        _require(features, "source", str, f"{origin}: features")
        _check_numbers({k: v for k, v in features.items() if k != "source"}, f"{origin}: features")
    return dict(data)


def load_paper_numbers(path: Path | str | None = None) -> dict:
    """The validated paper numbers; by default the file shipped inside the package."""
    if path is None:
        text = importlib.resources.files("iln").joinpath(PAPER_FILE).read_text(encoding="utf-8")
        origin = PAPER_FILE
    else:
        text = Path(path).read_text(encoding="utf-8")
        origin = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{origin}: not valid YAML: {err}") from err
    return validate_paper_numbers(data, origin)
