"""Reading one run's folder (train/, eval/, analysis/) into plain Python values.

A missing file means "not produced" (a group not run yet) and reads as None; a file that
exists but is malformed raises ValueError naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iln.analysis import FINAL_NORM_COLUMNS
from iln.probes import PROBE_COLUMNS, PROBES_CSV_COLUMNS, read_csv_rows

HISTORY_COLUMNS: tuple[str, ...] = ("step", "loss", "lr", "seconds_per_step")
PRECISION_MODES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
ANALYSIS_FIGURES: tuple[str, ...] = ("final_norm.png", "rpb_first.png", "rpb_last.png")

NORM_LABELS: dict[str, str] = {
    "ln": "LN",
    "iln": "i-LN",
    "ln_star": "LN*",
    "ln_rs": "LN+Rs",
    "rmsnorm": "RMSNorm",
    "layerscale": "LayerScale",
    "none": "no norm",
    "rezero": "ReZero",
    "batchnorm": "BN",
    "batchnorm_train": "BN (batch stats in eval)",
    "instancenorm": "InstanceNorm",
    "dyt": "DyT",
}
NORM_ORDER: tuple[str, ...] = tuple(NORM_LABELS)


def norm_label(norm: str) -> str:
    return NORM_LABELS.get(norm, norm)


def norm_rank(norm: str) -> int:
    return NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER)


@dataclass(frozen=True)
class RunInfo:
    """What the report needs from one declared run (a params.yaml `runs:` entry)."""

    name: str
    arch: str
    norm: str
    task: str
    stdnorm: bool | None = None  # None: the model's default (on for iln only)
    affine_outer: bool | None = None
    grad_clip: float = 0.0
    seed: int | None = None
    batch_size: int | None = None
    iterations: int | None = None
    groups: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, name: str, spec: object) -> RunInfo:
        """From a RunSpec-like object (attributes) or a mapping with the same keys."""

        inner = getattr(spec, "spec", None)  # a resolved run: .spec (RunSpec) and .train
        train = getattr(spec, "train", None) if inner is not None else None
        source = inner if inner is not None else spec

        def get(key: str, default: object = None, required: bool = False) -> object:
            value = None
            if isinstance(source, Mapping):
                value = source.get(key)
            elif hasattr(source, key):
                value = getattr(source, key)
            if value is None and train is not None:
                value = getattr(train, key, None)
            if value is None and required:
                raise ValueError(f"run {name!r}: missing required field {key!r}")
            return default if value is None else value

        groups = get("groups", ()) or ()
        if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
            raise ValueError(f"run {name!r}: groups must be a list of names, got {groups!r}")
        for key in ("arch", "norm", "task"):
            if not isinstance(get(key, required=True), str):
                raise ValueError(f"run {name!r}: {key} must be a string")
        grad_clip = get("grad_clip", 0.0)
        return cls(
            name=name,
            arch=str(get("arch")),
            norm=str(get("norm")),
            task=str(get("task")),
            stdnorm=get("stdnorm"),
            affine_outer=get("affine_outer"),
            grad_clip=float(grad_clip or 0.0),
            seed=get("seed"),
            batch_size=get("batch_size"),
            iterations=get("iterations"),
            groups=tuple(groups),
        )

    @property
    def stdnorm_on(self) -> bool:
        return self.stdnorm if self.stdnorm is not None else self.norm == "iln"

    @property
    def label(self) -> str:
        """Norm label plus what sets this run apart from the official pairing."""
        parts = [norm_label(self.norm)]
        if self.grad_clip > 0:
            parts.append(f"+ grad clip {self.grad_clip:g}")
        if self.stdnorm is not None and self.stdnorm != (self.norm == "iln"):
            parts.append("stdnorm on" if self.stdnorm else "stdnorm off")
        return " ".join(parts)


def _float(text: str, where: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected a number, got {text!r}") from err


def _read_json(path: Path) -> object | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def read_probes(path: Path) -> list[dict[str, object]] | None:
    """probes.csv rows with numeric fields as floats (step as int)."""
    if not path.exists():
        return None
    rows = []
    for i, raw in enumerate(read_csv_rows(path, PROBES_CSV_COLUMNS), start=2):
        where = f"{path}, line {i}"
        row: dict[str, object] = {"step": int(_float(raw["step"], where)), "layer": raw["layer"]}
        for col in PROBE_COLUMNS[1:]:
            row[col] = _float(raw[col], where)
        rows.append(row)
    return rows


def read_features(path: Path) -> list[dict[str, object]] | None:
    """analysis/features.csv rows (probes columns without step)."""
    if not path.exists():
        return None
    rows = []
    for i, raw in enumerate(read_csv_rows(path, PROBE_COLUMNS), start=2):
        row: dict[str, object] = {"layer": raw["layer"]}
        for col in PROBE_COLUMNS[1:]:
            row[col] = _float(raw[col], f"{path}, line {i}")
        rows.append(row)
    return rows


def read_history(path: Path) -> list[dict[str, float]] | None:
    if not path.exists():
        return None
    return [
        {col: _float(raw[col], f"{path}, line {i}") for col in HISTORY_COLUMNS}
        for i, raw in enumerate(read_csv_rows(path, HISTORY_COLUMNS), start=2)
    ]


def read_final_norm(path: Path) -> list[dict[str, float]] | None:
    if not path.exists():
        return None
    return [
        {col: _float(raw[col], f"{path}, line {i}") for col in FINAL_NORM_COLUMNS}
        for i, raw in enumerate(read_csv_rows(path, FINAL_NORM_COLUMNS), start=2)
    ]


def read_metrics(path: Path) -> dict[str, dict[str, float]] | None:
    """eval/metrics.json: {"<task>/<set>": {"psnr": .., "ssim": ..}}."""
    data = _read_json(path)
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path}: expected an object {{'<task>/<set>': {{'psnr': .., 'ssim': ..}}}}"
        )
    out = {}
    for key, value in data.items():
        if key == "released":  # a released entry's weights record, read by report.released
            continue
        if "/" not in key or not isinstance(value, Mapping):
            raise ValueError(
                f"{path}: entry {key!r} must be '<task>/<set>': {{'psnr': .., 'ssim': ..}}"
            )
        out[key] = {}
        for metric, number in value.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(f"{path}: {key}.{metric} must be a number, got {number!r}")
            out[key][metric] = float(number)
    return out


def read_precision(path: Path) -> dict[str, dict[str, dict[str, object]]] | None:
    """eval/precision.json: {"<mode>": {"<set>": {"psnr": .., "overflow": bool}}}."""
    data = _read_json(path)
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path}: expected an object {{'<mode>': {{'<set>': {{'psnr': .., 'overflow': ..}}}}}}"
        )
    out: dict[str, dict[str, dict[str, object]]] = {}
    for mode, sets in data.items():
        if not isinstance(sets, Mapping):
            raise ValueError(f"{path}: {mode!r} must map set names to {{'psnr', 'overflow'}}")
        out[mode] = {}
        for set_name, entry in sets.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"{path}: {mode}.{set_name} must be an object")
            psnr = entry.get("psnr")
            if psnr is not None and (isinstance(psnr, bool) or not isinstance(psnr, (int, float))):
                raise ValueError(
                    f"{path}: {mode}.{set_name}.psnr must be a number or null, got {psnr!r}"
                )
            overflow = entry.get("overflow")
            if overflow is not None and not isinstance(overflow, bool):
                raise ValueError(
                    f"{path}: {mode}.{set_name}.overflow must be true/false, got {overflow!r}"
                )
            out[mode][set_name] = {
                "psnr": None if psnr is None else float(psnr),
                "overflow": overflow,
            }
    return out


def _group_index(layer: str) -> int | None:
    if layer.startswith("group") and layer[5:].isdigit():
        return int(layer[5:])
    return None


@dataclass
class RunResults:
    """Everything found on disk for one run; absent files are None."""

    info: RunInfo
    folder: Path
    probes: list[dict[str, object]] | None = None
    history: list[dict[str, float]] | None = None
    metrics: dict[str, dict[str, float]] | None = None
    precision: dict[str, dict[str, dict[str, object]]] | None = None
    features: list[dict[str, object]] | None = None
    final_norm: list[dict[str, float]] | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    report_sets: tuple[str, ...] | None = None  # sets to show, in order (None: all)

    @classmethod
    def load(cls, info: RunInfo, folder: Path, *, sets: Sequence[str] | None = None) -> RunResults:
        folder = Path(folder)
        return cls(
            info=info,
            folder=folder,
            report_sets=None if sets is None else tuple(sets),
            probes=read_probes(folder / "train" / "probes.csv"),
            history=read_history(folder / "train" / "history.csv"),
            metrics=read_metrics(folder / "eval" / "metrics.json"),
            precision=read_precision(folder / "eval" / "precision.json"),
            features=read_features(folder / "analysis" / "features.csv"),
            final_norm=read_final_norm(folder / "analysis" / "final_norm.csv"),
            figures={
                n: folder / "analysis" / n
                for n in ANALYSIS_FIGURES
                if (folder / "analysis" / n).exists()
            },
        )

    @property
    def has_results(self) -> bool:
        return any(
            v
            for v in (
                self.probes,
                self.history,
                self.metrics,
                self.precision,
                self.features,
                self.final_norm,
            )
        )

    # ---- evaluation

    def sets(self) -> list[str]:
        """Test sets evaluated for the run's own task, in file order."""
        prefix = f"{self.info.task}/"
        found = [k[len(prefix) :] for k in (self.metrics or {}) if k.startswith(prefix)]
        if self.report_sets is None:
            return found
        return [s for s in self.report_sets if s in found]

    def metric(self, set_name: str, metric: str) -> float | None:
        entry = (self.metrics or {}).get(f"{self.info.task}/{set_name}")
        return None if entry is None else entry.get(metric)

    # ---- features

    def final_features(self) -> tuple[list[dict[str, object]], str] | None:
        """Final-checkpoint features (analysis/features.csv), else the last probes step."""
        if self.features:
            return self.features, "final checkpoint"
        if self.probes:
            last = max(int(r["step"]) for r in self.probes)
            return [r for r in self.probes if r["step"] == last], f"probe at step {last}"
        return None

    def deepest_layer(self) -> str | None:
        found = self.final_features()
        if found is None:
            return None
        groups = [
            (i, r["layer"]) for r in found[0] if (i := _group_index(str(r["layer"]))) is not None
        ]
        return max(groups)[1] if groups else None

    def final_stat(self, stat: str, layer: str | None = None) -> float | None:
        """A statistic of the final features at `layer` (default: the deepest group)."""
        found = self.final_features()
        layer = layer or self.deepest_layer()
        if found is None or layer is None:
            return None
        for row in found[0]:
            if row["layer"] == layer:
                return float(row[stat])
        return None

    def final_max_abs(self) -> float | None:
        """Largest |x| over every probed layer of the final features."""
        found = self.final_features()
        if found is None:
            return None
        return max(float(r["max_abs"]) for r in found[0])

    def training_max_abs(self) -> float | None:
        """Largest |x| over every probed layer and every probe step during training."""
        if not self.probes:
            return None
        values = [float(r["max_abs"]) for r in self.probes if not math.isnan(float(r["max_abs"]))]
        return max(values) if values else None

    def group_layers(self) -> list[str]:
        """Probed group outputs in depth order (group0, group1, ...)."""
        names = {str(r["layer"]) for r in (self.probes or [])}
        indexed = [(_group_index(n), n) for n in names]
        return [n for i, n in sorted((i, n) for i, n in indexed if i is not None)]

    def curve(self, layer: str, stat: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one statistic at one layer over training."""
        points = sorted(
            (int(r["step"]), float(r[stat])) for r in (self.probes or []) if r["layer"] == layer
        )
        return [p[0] for p in points], [p[1] for p in points]

    def mean_seconds_per_step(self) -> float | None:
        if not self.history:
            return None
        values = [
            r["seconds_per_step"] for r in self.history if math.isfinite(r["seconds_per_step"])
        ]
        return sum(values) / len(values) if values else None

    def last_step(self) -> int | None:
        steps = [int(r["step"]) for r in (self.probes or [])] + [
            int(r["step"]) for r in (self.history or [])
        ]
        return max(steps) if steps else None


def load_runs(
    runs: Mapping[str, object], runs_dir: Path | str, *, sets: Sequence[str] | None = None
) -> dict[str, RunResults]:
    """RunResults for every declared run (RunSpec-like objects or mappings), in order."""
    runs_dir = Path(runs_dir)
    out = {}
    for name, spec in runs.items():
        info = spec if isinstance(spec, RunInfo) else RunInfo.from_spec(name, spec)
        out[name] = RunResults.load(info, runs_dir / name, sets=sets)
    return out


__all__ = [
    "NORM_LABELS",
    "NORM_ORDER",
    "RunInfo",
    "RunResults",
    "load_runs",
    "norm_label",
    "norm_rank",
]
