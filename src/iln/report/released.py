"""The report's section on the authors' released checkpoints (``released:`` in params.yaml).

For every entry: PSNR / SSIM per test set beside the paper's number for the same arch, norm,
scale and set (where paper_numbers.yaml has one), the weights file and its SHA-256, whether
the number was tiled; the feature statistics of the final model (where LN's 1e6 magnitudes
show); the inference-precision table; links to the Fig. 8 / Fig. 9 analyses. Reads only the
entry's ``eval/`` and ``analysis/`` folders: a released entry has no ``train/``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iln.files import read_csv_rows, write_csv_atomic, write_text_atomic
from iln.layout import PROBE_COLUMNS

CSV_COLUMNS = ("entry", "set", "metric", "paper", "ours", "paper_table", "file", "sha256", "tile")
FIGURES = ("final_norm.png", "rpb_first.png", "rpb_last.png")
MODES = ("fp32", "fp16", "bf16", "int8")
NORM_LABELS = {"ln": "LN", "iln": "i-LN"}


def paper_number(
    paper: Mapping, *, arch: str, norm: str, task: str, set_name: str, metric: str
) -> tuple[float, str] | None:
    """(value, table key) of the paper's full-precision number for this model and set, if it
    has one. A row matches through its own keys over its table's ``setting`` (arch, task);
    rows without an arch, of another precision or of a training variant are never matched:
    a number for another model is not put beside a released one."""
    for key, table in paper.get("tables", {}).items():
        setting = table.get("setting") or {}
        for row in table.get("rows") or []:
            cell = {**setting, **row}
            if "precision" in cell or "variant" in cell or metric not in cell:
                continue
            wanted = {"arch": arch, "task": task, "set": set_name, "norm": norm}
            if all(cell.get(k) == v for k, v in wanted.items()):
                return float(cell[metric]), key
    return None


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _model(spec: Any) -> str:
    parts = [spec.arch, NORM_LABELS.get(spec.norm, spec.norm), f"x{spec.scale}"]
    if spec.stdnorm is not None:
        parts.append("stdnorm" if spec.stdnorm else "no stdnorm")
    return " ".join(parts)


def _evaluation(record: Mapping) -> str:
    tile = int(record.get("tile") or 0)
    if tile:
        return f"tiled ({tile} px LR tiles, {int(record.get('tile_overlap') or 0)} overlap)"
    return "whole image"


def _features(path: Path) -> list[dict[str, str]]:
    return read_csv_rows(path, PROBE_COLUMNS) if path.exists() else []


def _deepest(rows: Sequence[Mapping[str, str]]) -> Mapping[str, str] | None:
    groups = [
        (int(r["layer"][5:]), r)
        for r in rows
        if r["layer"].startswith("group") and r["layer"][5:].isdigit()
    ]
    return max(groups, key=lambda g: g[0])[1] if groups else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def released_section(
    released: Mapping[str, Any], runs_dir: Path | str, out_dir: Path | str, paper: Mapping
) -> list[str]:
    """Markdown lines of the section; also writes out_dir/tables/released.{md,csv}.

    ``released``: entry name -> a ``ReleasedSpec``-like object (arch, norm, task, scale,
    stdnorm, weights). Entries without results yet are listed as not evaluated.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    md = ["## Released checkpoints (the authors' weights, evaluated without training)", ""]
    if not released:
        return md + [
            "None declared (`released:` in params.yaml; README: \"The authors' released "
            'checkpoints").',
            "",
        ]

    metric_rows: list[list[str]] = []
    csv_rows: list[dict[str, object]] = []
    feature_rows: list[list[str]] = []
    precision_rows: list[list[str]] = []
    ensemble_rows: list[list[str]] = []
    figure_rows: list[list[str]] = []
    notes: set[str] = set()
    for name, spec in released.items():
        folder = runs_dir / name
        metrics = _read_json(folder / "eval" / "metrics.json") or {}
        record = metrics.get("released") or {}
        sha = str(record.get("sha256") or "–")
        file_name = Path(str(record.get("file") or spec.weights)).name
        prefix = f"{spec.task}/"
        sets = [k[len(prefix) :] for k in metrics if k.startswith(prefix)]
        if not sets:
            metric_rows.append([name, file_name, sha[:12], _model(spec), "not evaluated yet"])
            metric_rows[-1] += ["–"] * 5
        for set_name in sets:
            values = metrics[f"{prefix}{set_name}"]
            cells = [name, file_name, sha[:12], _model(spec), set_name]
            for metric, digits in (("psnr", 2), ("ssim", 4)):
                found = paper_number(
                    paper,
                    arch=spec.arch,
                    norm=spec.norm,
                    task=spec.task,
                    set_name=set_name,
                    metric=metric,
                )
                ours = _number(values.get(metric))
                cells += [f"{found[0]:g}" if found else "–", _fmt(ours, digits)]
                csv_rows.append(
                    {
                        "entry": name,
                        "set": set_name,
                        "metric": metric,
                        "paper": found[0] if found else "",
                        "ours": "" if ours is None else ours,
                        "paper_table": found[1] if found else "",
                        "file": record.get("file", spec.weights),
                        "sha256": sha,
                        "tile": int(record.get("tile") or 0),
                    }
                )
                if found:
                    notes.add(f"{found[1]}: {paper['tables'][found[1]]['source']}")
            metric_rows.append(cells + [_evaluation(record)])
            x8 = {m: _number(values.get(m)) for m in ("psnr_x8", "ssim_x8")}
            if any(v is not None for v in x8.values()):  # evaluated with evaluate.self_ensemble
                ensemble_rows.append(
                    [name, set_name, _fmt(x8["psnr_x8"], 2), _fmt(x8["ssim_x8"], 4)]
                )
                csv_rows += [
                    {
                        "entry": name,
                        "set": set_name,
                        "metric": metric,
                        "paper": "",
                        "ours": "" if value is None else value,
                        "paper_table": "",
                        "file": record.get("file", spec.weights),
                        "sha256": sha,
                        "tile": int(record.get("tile") or 0),
                    }
                    for metric, value in x8.items()
                ]

        features = _features(folder / "analysis" / "features.csv")
        deepest = _deepest(features)
        if deepest is not None:
            feature_rows.append(
                [
                    name,
                    _model(spec),
                    deepest["layer"],
                    f"{float(deepest['magnitude']):.3g}",
                    f"{float(deepest['max_abs']):.3g}",
                    f"{max(float(r['max_abs']) for r in features):.3g}",
                    f"{float(deepest['entropy']):.3f} / {float(deepest['entropy_ceiling']):.3f}",
                ]
            )
        precision = _read_json(folder / "eval" / "precision.json") or {}
        for set_name in sorted({s for mode in precision.values() for s in mode}):
            cells = [name, _model(spec), set_name]
            for mode in MODES:
                entry = (precision.get(mode) or {}).get(set_name)
                if entry is None:
                    cells.append("–")
                    continue
                text = _fmt(_number(entry.get("psnr")), 2)
                cells.append(text + (" (overflow)" if entry.get("overflow") else ""))
            precision_rows.append(cells)
        links = [
            f"[{f}]({Path(os.path.relpath(folder / 'analysis' / f, out_dir)).as_posix()})"
            if (folder / "analysis" / f).exists()
            else "–"
            for f in FIGURES
        ]
        if any(link != "–" for link in links):
            figure_rows.append([name, _model(spec), *links])
        if record.get("precision_crop"):
            notes.add(
                f"precision: central {record['precision_crop']} px LR crops of the test images "
                "(evaluate.precision_crop), not whole images"
            )

    body = _table(
        [
            "entry",
            "file",
            "SHA-256 (first 12)",
            "model",
            "set",
            "PSNR (paper)",
            "PSNR (ours)",
            "SSIM (paper)",
            "SSIM (ours)",
            "evaluation",
        ],
        metric_rows,
    )
    body += [
        "",
        "PSNR / SSIM on Y, border = scale, output rounded to uint8; whole image with reflect "
        "padding at the bottom/right to a multiple of the window (the authors' test protocol) "
        "unless the evaluation column says tiled. Full SHA-256 in the CSV.",
        "",
    ]
    if ensemble_rows:
        body += [
            "x8 self-ensemble (evaluate.self_ensemble: the 8 flips / transposes of each input, "
            "outputs transformed back and averaged before rounding; the paper reports none):",
            "",
            *_table(["entry", "set", "PSNR x8 (ours)", "SSIM x8 (ours)"], ensemble_rows),
            "",
        ]
    if feature_rows:
        body += [
            "Final-model features on the probe images (Fig. 1's end point; max |x| as in Table 8):",
            "",
            *_table(
                [
                    "entry",
                    "model",
                    "deepest group",
                    "mean x^2",
                    "max |x|",
                    "max |x|, any layer",
                    "entropy / ceiling",
                ],
                feature_rows,
            ),
            "",
        ]
    if precision_rows:
        body += [
            "Inference precision, PSNR in dB (Table 4 style):",
            "",
            *_table(["entry", "model", "set", *MODES], precision_rows),
            "",
        ]
    body += [f"- {note}" for note in sorted(notes)]
    write_text_atomic(
        out_dir / "tables" / "released.md", "\n".join(["# Released checkpoints", "", *body, ""])
    )
    write_csv_atomic(out_dir / "tables" / "released.csv", csv_rows, CSV_COLUMNS)
    md += [*body, "", "- CSV: [tables/released.csv](tables/released.csv)", ""]
    if figure_rows:
        md += [
            "Final-norm bias against its input (Fig. 8) and relative position bias (Fig. 9):",
            "",
            *_table(
                ["entry", "model", "final norm", "rpb, first group", "rpb, last group"], figure_rows
            ),
            "",
        ]
    return md
