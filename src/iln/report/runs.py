"""Reading one run's folder (train/, eval/, analysis/) into plain Python values.

A missing file means "not produced" (a group not run yet) and reads as None; a file that
exists but is malformed raises ValueError naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iln.config.params import Params, ReleasedSpec, resolve_run
from iln.data.params import parse_task
from iln.util.files import read_csv_rows
from iln.config.layout import (
    ANALYSIS_FIGURES,
    FEATURES_COLUMNS,
    FEATURES_OPTIONAL,
    FINAL_NORM_COLUMNS,
    HISTORY_COLUMNS,
    HISTORY_OPTIONAL,
    PROBE_COLUMNS,
    PROBES_CSV_COLUMNS,
    WEIGHTS_EMA,
    WEIGHTS_RAW,
    RunFiles,
)
from iln.figures.styles import norm_label
from iln.weights.subject import Subject


@dataclass(frozen=True)
class RunInfo:
    """What the report needs from one declared run (a params.yaml `runs:` entry, or a
    `released:` one)."""

    name: str
    arch: str
    norm: str
    task: str
    stdnorm: bool | None = None  # None: the model's default (on for iln only)
    affine_outer: bool | None = None
    grad_clip: float = 0.0
    kld_weight: float = 0.0
    seed: int | None = None
    batch_size: int | None = None
    iterations: int | None = None
    groups: tuple[str, ...] = ()
    model: Mapping[str, object] = field(default_factory=dict)  # the run's model overrides

    weights: str | None = None  # a released entry: its weights file as params.yaml names it

    @classmethod
    def from_subject(cls, subject: Subject, params: Params) -> RunInfo:
        """What the report shows of a trained run (its unset settings filled in from
        ``train:``) or of a released entry (never trained here: no training settings)."""
        spec = subject.spec
        if spec is None:
            raise ValueError(f"{subject.name}: the baseline has no run folder to report on")
        shared = dict(
            name=subject.name,
            arch=spec.arch,
            norm=spec.norm,
            task=spec.task,
            stdnorm=spec.stdnorm,
            affine_outer=spec.affine_outer,
            model=dict(spec.model),
        )
        if isinstance(spec, ReleasedSpec):
            return cls(**shared, weights=spec.weights)
        train = resolve_run(params, subject.name).train
        return cls(
            **shared,
            grad_clip=train.grad_clip,
            kld_weight=train.kld_weight,
            seed=train.seed,
            batch_size=train.batch_size,
            iterations=train.iterations,
            groups=spec.groups,
        )

    @property
    def stdnorm_on(self) -> bool:
        return self.stdnorm if self.stdnorm is not None else self.norm == "iln"

    @property
    def stdnorm_switched(self) -> bool:
        """stdnorm set against the official pairing (on for i-LN, off for the rest)."""
        return self.stdnorm is not None and self.stdnorm != (self.norm == "iln")

    @property
    def variant(self) -> str:
        """The norm plus the stabiliser it was trained with: ln, ln_gradclip, ln_kld, ..."""
        return (
            self.norm
            + ("_gradclip" if self.grad_clip > 0 else "")
            + ("_kld" if self.kld_weight > 0 else "")
        )

    @property
    def label(self) -> str:
        """Norm label plus what sets this run apart from the official pairing."""
        parts = [norm_label(self.norm)]
        if self.grad_clip > 0:
            parts.append(f"+ grad clip {self.grad_clip:g}")
        if self.kld_weight > 0:
            parts.append(f"+ KL reg. {self.kld_weight:g}")
        if self.stdnorm_switched:
            parts.append("stdnorm on" if self.stdnorm else "stdnorm off")
        return " ".join(parts)

    @property
    def scale(self) -> int | None:
        """The SR factor of an sr_x<s> task (None for other tasks, real-world SR included)."""
        task = parse_task(self.task, f"run {self.name!r}: task")
        return task.scale if task.kind == "sr" else None


def _float(text: str, where: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected a number, got {text!r}") from err


def _csv(path: Path, columns: Sequence[str], row: Callable, optional: Sequence[str] = ()):
    """``row(raw, where)`` of every data line of a CSV with ``columns`` (``optional`` may be
    absent); None: no file."""
    if not path.exists():
        return None
    raws = read_csv_rows(path, [c for c in columns if c not in optional])
    return [row(raw, f"{path}, line {i}") for i, raw in enumerate(raws, start=2)]


def _floats(raw: Mapping[str, str], columns: Sequence[str], where: str) -> dict[str, float]:
    return {c: _float(raw[c], where) for c in columns}


def _json(path: Path, shape: str) -> Mapping | None:
    """A JSON object; ``shape`` is what the error says was expected."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected an object {shape}")
    return data


def _number(value: object, where: str) -> float | None:
    """A JSON number as a float; null (strict JSON's non-finite value) as None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where} must be a number or null, got {value!r}")
    return None if value is None else float(value)


def read_probes(path: Path) -> list[dict[str, object]] | None:
    """probes.csv rows with numeric fields as floats (step as int)."""

    def row(raw: Mapping[str, str], where: str) -> dict[str, object]:
        step = int(_float(raw["step"], where))
        return {"step": step, "layer": raw["layer"], **_floats(raw, PROBE_COLUMNS[1:], where)}

    return _csv(path, PROBES_CSV_COLUMNS, row)


def read_features(path: Path) -> list[dict[str, object]] | None:
    """analysis/features.csv rows; ``weights`` is ``ema`` or ``raw`` (``ema`` when the file
    has no such column: it predates the column, and model.pt holds the EMA weights)."""

    def row(raw: Mapping[str, str], where: str) -> dict[str, object]:
        weights = raw.get("weights") or WEIGHTS_EMA
        if weights not in (WEIGHTS_EMA, WEIGHTS_RAW):
            raise ValueError(f"{where}: weights must be {WEIGHTS_EMA!r} or {WEIGHTS_RAW!r}")
        return {"weights": weights, "layer": raw["layer"], **_floats(raw, PROBE_COLUMNS[1:], where)}

    return _csv(path, FEATURES_COLUMNS, row, FEATURES_OPTIONAL)


def read_history(path: Path) -> list[dict[str, float | None]] | None:
    """history.csv rows; ``val_psnr`` is None on rows without validation."""
    required = [c for c in HISTORY_COLUMNS if c not in HISTORY_OPTIONAL]

    def row(raw: Mapping[str, str], where: str) -> dict[str, float | None]:
        val = raw.get("val_psnr")
        return {**_floats(raw, required, where), "val_psnr": _float(val, where) if val else None}

    return _csv(path, HISTORY_COLUMNS, row, HISTORY_OPTIONAL)


def read_final_norm(path: Path) -> list[dict[str, float]] | None:
    return _csv(
        path, FINAL_NORM_COLUMNS, lambda raw, where: _floats(raw, FINAL_NORM_COLUMNS, where)
    )


def read_metrics(path: Path) -> tuple[dict[str, dict[str, float]] | None, dict | None]:
    """eval/metrics.json: ({"<task>/<set>": {"psnr": .., "ssim": ..}}, the weights record of a
    released entry under "released": file, sha256, tile, ... (None for a trained run))."""
    data = _json(path, "{'<task>/<set>': {'psnr': .., 'ssim': ..}}")
    if data is None:
        return None, None
    record = data.get("released")
    if record is not None and not isinstance(record, Mapping):
        raise ValueError(f"{path}: 'released' must be an object (file, sha256, tile, ...)")
    out = {}
    for key, value in data.items():
        if key == "released":
            continue
        if "/" not in key or not isinstance(value, Mapping):
            raise ValueError(
                f"{path}: entry {key!r} must be '<task>/<set>': {{'psnr': .., 'ssim': ..}}"
            )
        numbers = {m: _number(v, f"{path}: {key}.{m}") for m, v in value.items()}
        out[key] = {m: v for m, v in numbers.items() if v is not None}
    return out, None if record is None else dict(record)


def read_precision(path: Path) -> dict[str, dict[str, dict[str, object]]] | None:
    """eval/precision.json: {"<mode>": {"<set>": {"psnr": .., "overflow": bool}}}."""
    data = _json(path, "{'<mode>': {'<set>': {'psnr': .., 'overflow': ..}}}")
    if data is None:
        return None
    out: dict[str, dict[str, dict[str, object]]] = {}
    for mode, sets in data.items():
        if not isinstance(sets, Mapping):
            raise ValueError(f"{path}: {mode!r} must map set names to {{'psnr', 'overflow'}}")
        out[mode] = {}
        for set_name, entry in sets.items():
            where = f"{path}: {mode}.{set_name}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be an object")
            overflow = entry.get("overflow")
            if overflow is not None and not isinstance(overflow, bool):
                raise ValueError(f"{where}.overflow must be true/false, got {overflow!r}")
            psnr = _number(entry.get("psnr"), f"{where}.psnr")
            out[mode][set_name] = {"psnr": psnr, "overflow": overflow}
    return out


def read_model(path: Path) -> dict[str, object] | None:
    """train/summary.json's "model": the model's resolved hyper-parameters (None: no file, or
    one written before they were recorded)."""
    data = _json(path, "{'steps': .., 'model': {..}, ...}")
    model = None if data is None else data.get("model")
    if model is None:
        return None
    depths = model.get("depths") if isinstance(model, Mapping) else None
    if not (
        isinstance(depths, list)
        and depths
        and all(type(d) is int for d in depths)
        and type(model.get("embed_dim")) is int
    ):
        raise ValueError(
            f"{path}: 'model' must be an object with 'depths' (a list of integers) and "
            "'embed_dim' (an integer)"
        )
    return dict(model)


def _group_index(layer: str) -> int | None:
    if layer.startswith("group") and layer[5:].isdigit():
        return int(layer[5:])
    return None


@dataclass(frozen=True)
class Stats:
    """Feature statistics of one set of weights at one moment, and where they come from."""

    rows: list[dict[str, object]]
    weights: str  # ema | raw
    source: str  # e.g. "final checkpoint" or "probe at step 600"


@dataclass
class RunResults:
    """Everything found on disk for one run; absent files are None."""

    info: RunInfo
    folder: Path
    probes: list[dict[str, object]] | None = None
    history: list[dict[str, float | None]] | None = None
    metrics: dict[str, dict[str, float]] | None = None
    precision: dict[str, dict[str, dict[str, object]]] | None = None
    features: list[dict[str, object]] | None = None
    final_norm: list[dict[str, float]] | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    weights_record: dict | None = None  # a released entry's weights file, SHA-256, tiling
    report_sets: tuple[str, ...] | None = None  # sets to show, in order (None: all)
    model: dict[str, object] | None = None  # resolved hyper-parameters (train/summary.json)

    @classmethod
    def load(cls, info: RunInfo, folder: Path, *, sets: Sequence[str] | None = None) -> RunResults:
        files = RunFiles(Path(folder))
        metrics, record = read_metrics(files.metrics)
        return cls(
            info=info,
            folder=files.folder,
            report_sets=None if sets is None else tuple(sets),
            probes=read_probes(files.probes),
            history=read_history(files.history),
            metrics=metrics,
            weights_record=record,
            precision=read_precision(files.precision),
            features=read_features(files.features),
            final_norm=read_final_norm(files.final_norm),
            model=read_model(files.train_summary),
            figures={
                n: files.analysis_dir / n
                for n in ANALYSIS_FIGURES
                if (files.analysis_dir / n).exists()
            },
        )

    @property
    def has_results(self) -> bool:
        found = (self.probes, self.history, self.metrics, self.precision, self.features)
        return any(found) or bool(self.final_norm)

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

    def stats(self, weights: str) -> Stats | None:
        """Final statistics of the EMA or the raw (trained) weights.

        EMA: analysis/features.csv rows of the EMA weights. Raw: analysis/features.csv rows
        of the raw weights, else the last training probe (probes measure the raw weights).
        """
        if weights not in (WEIGHTS_EMA, WEIGHTS_RAW):
            raise ValueError(f"weights must be {WEIGHTS_EMA!r} or {WEIGHTS_RAW!r}, got {weights!r}")
        rows = [r for r in self.features or [] if r["weights"] == weights]
        if rows:
            return Stats(rows, weights, "final checkpoint")
        if weights == WEIGHTS_RAW and self.probes:
            last = self.last_probe_step()
            return Stats(
                [r for r in self.probes if r["step"] == last], weights, f"probe at step {last}"
            )
        return None

    def deepest_layer(self, weights: str = WEIGHTS_RAW) -> str | None:
        found = self.stats(weights)
        if found is None:
            return None
        groups = [
            (i, r["layer"]) for r in found.rows if (i := _group_index(str(r["layer"]))) is not None
        ]
        return max(groups)[1] if groups else None

    def final_stat(self, stat: str, weights: str, layer: str | None = None) -> float | None:
        """A final statistic of the EMA or raw weights at `layer` (default: deepest group)."""
        found = self.stats(weights)
        layer = layer or self.deepest_layer(weights)
        if found is None or layer is None:
            return None
        for row in found.rows:
            if row["layer"] == layer:
                return float(row[stat])
        return None

    def deepest(self) -> dict[str, float | None]:
        """deepest_magnitude_raw, deepest_entropy_raw, the same of the EMA weights (the
        deepest group's final statistics) and the entropy ceiling ln C."""
        out = {
            f"deepest_{stat}_{weights}": self.final_stat(stat, weights)
            for weights in (WEIGHTS_RAW, WEIGHTS_EMA)
            for stat in ("magnitude", "entropy")
        }
        ceiling = self.final_stat("entropy_ceiling", WEIGHTS_RAW)
        return out | {"entropy_ceiling": ceiling or self.final_stat("entropy_ceiling", WEIGHTS_EMA)}

    def final_max_abs(self, weights: str) -> float | None:
        """Largest |x| over every probed layer of the final statistics."""
        found = self.stats(weights)
        if found is None:
            return None
        return max(float(r["max_abs"]) for r in found.rows)

    def training_max_abs(self) -> float | None:
        """Largest |x| over every probed layer and every probe step during training."""
        if not self.probes:
            return None
        values = [float(r["max_abs"]) for r in self.probes if not math.isnan(float(r["max_abs"]))]
        return max(values) if values else None

    def last_probe_step(self) -> int | None:
        return max((int(r["step"]) for r in self.probes or []), default=None)

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

    def history_curve(self, column: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a history.csv column, rows without a value left out."""
        points = [
            (int(r["step"]), float(r[column]))
            for r in self.history or []
            if r.get(column) is not None
        ]
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
    runs: Mapping[str, RunInfo], runs_dir: Path | str, *, sets: Sequence[str] | None = None
) -> dict[str, RunResults]:
    """RunResults for every run, in order, read from ``runs_dir/<name>``."""
    runs_dir = Path(runs_dir)
    return {name: RunResults.load(info, runs_dir / name, sets=sets) for name, info in runs.items()}
