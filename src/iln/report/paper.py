"""The paper's numbers (src/iln/report/paper_numbers.yaml): loading, strict validation, lookup."""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path

import yaml

PAPER_FILE = "paper_numbers.yaml"
TABLE_KEYS = {"title", "source", "setting", "rows"}
IDENTITY_KEYS = ("norm", "variant", "task", "set", "arch", "precision")
METRIC_KEYS = ("psnr", "ssim", "max_abs", "magnitude")
TEXT_KEYS = ("finding",)


class PaperNumber(float):
    """A number of the paper as the yaml writes it: ``text`` keeps its printed digits
    (``7.4640``, ``0.9150``), which a float alone would lose."""

    text: str

    def __new__(cls, value: float, text: str) -> PaperNumber:
        number = super().__new__(cls, value)
        number.text = text
        return number

    def __reduce__(self):  # copy / pickle keep the printed text
        return (PaperNumber, (float(self), self.text))


class _Loader(yaml.SafeLoader):
    """Safe YAML whose floats remember their text (PaperNumber)."""


def _float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> PaperNumber:
    return PaperNumber(loader.construct_yaml_float(node), node.value)


_Loader.add_constructor("tag:yaml.org,2002:float", _float)


def printed(value: float | str) -> str:
    """The paper's number as printed (its text in the yaml), or its words."""
    if isinstance(value, str):
        return value
    return getattr(value, "text", None) or format(value, ".6g")


def _require(mapping: Mapping, key: str, kind: type, where: str) -> object:
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(mapping[key], kind):
        raise ValueError(f"{where}.{key}: expected a {kind.__name__}, got {mapping[key]!r}")
    return mapping[key]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    unknown = set(row) - {*IDENTITY_KEYS, *METRIC_KEYS, *TEXT_KEYS}
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected identity keys "
            f"{list(IDENTITY_KEYS)}, numbers {list(METRIC_KEYS)} or text {list(TEXT_KEYS)}"
        )
    for key, value in row.items():
        number = key in METRIC_KEYS
        if not (_is_number(value) if number else isinstance(value, str)):
            raise ValueError(
                f"{where}.{key}: expected {'a number' if number else 'a string'}, got "
                f"{type(value).__name__} {value!r}"
            )
    if not any(k in row for k in IDENTITY_KEYS):
        raise ValueError(f"{where}: no identity key (one of {list(IDENTITY_KEYS)})")
    if not any(k in row for k in (*METRIC_KEYS, *TEXT_KEYS)):
        raise ValueError(f"{where}: no number and no finding")


def validate_paper_numbers(data: object, origin: str = PAPER_FILE) -> dict:
    """Check the structure; raise ValueError naming the file and key on anything unexpected."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin}: expected a mapping at the top level")
    _require(data, "paper", str, origin)
    for name, table in _require(data, "tables", Mapping, origin).items():
        where = f"{origin}: tables.{name}"
        if not (isinstance(name, str) and name.startswith("table") and name[5:].isdigit()):
            raise ValueError(f"{where}: table keys are table<N>, N the paper's table number")
        if not isinstance(table, Mapping) or set(table) - TABLE_KEYS:
            raise ValueError(f"{where}: expected a mapping of {sorted(TABLE_KEYS)}")
        _require(table, "title", str, where)
        _require(table, "source", str, where)
        setting = _require(table, "setting", Mapping, where) if "setting" in table else {}
        for key, value in setting.items():
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"{where}.setting.{key}: expected a name or an integer")
        for i, row in enumerate(_require(table, "rows", list, where)):
            _check_row(row, f"{where}.rows[{i}]")
    if "features" in data:
        features = _require(data, "features", Mapping, origin)
        _require(features, "source", str, f"{origin}: features")
        for key, value in features.items():
            if key != "source" and not _is_number(value):
                raise ValueError(f"{origin}: features.{key}: expected a number, got {value!r}")
    return dict(data)


def load_paper_numbers(path: Path | str | None = None) -> dict:
    """The validated paper numbers; by default the file shipped inside the package."""
    if path is None:
        text = importlib.resources.files("iln.report").joinpath(PAPER_FILE).read_text("utf-8")
        origin = PAPER_FILE
    else:
        text = Path(path).read_text(encoding="utf-8")
        origin = str(path)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ValueError(f"{origin}: not valid YAML: {err}") from err
    return validate_paper_numbers(data, origin)


def paper_rows(paper: Mapping, table: str, **identity: str | None) -> list[Mapping]:
    """Rows of one paper table whose identity keys equal the given ones (None: key absent)."""
    rows = (paper["tables"].get(table) or {}).get("rows") or []
    return [r for r in rows if all(r.get(k) == v for k, v in identity.items())]


def paper_number(
    paper: Mapping, *, arch: str, norm: str, task: str, set_name: str, metric: str
) -> tuple[float, str] | None:
    """(value, table key) of the paper's full-precision number for this model and set, if it
    has one. A row matches through its own keys over its table's ``setting`` (arch, task);
    rows without an arch, of another precision or of a training variant are never matched:
    a number for another model is not put beside a released one."""
    wanted = {"arch": arch, "task": task, "set": set_name, "norm": norm}
    for key, table in paper["tables"].items():
        for row in table.get("rows") or []:
            cell = {**(table.get("setting") or {}), **row}
            if "precision" in cell or "variant" in cell or metric not in cell:
                continue
            if all(cell.get(k) == v for k, v in wanted.items()):
                return cell[metric], key
    return None
