"""Paper tables rebuilt from our runs, the paper's numbers beside ours.

A Table is rows x columns of cells; each cell may hold the paper's value and ours. It
renders as markdown (a "(paper)" and an "(ours)" column wherever the paper has a number)
and as long-format CSV (row, column, paper, ours, run, status) for machines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from iln.report.runs import PRECISION_MODES, RunResults, norm_label, norm_rank

TABLE_CSV_COLUMNS: tuple[str, ...] = ("row", "column", "paper", "ours", "run", "status")
NOT_RUN = "not run"
MISSING = "–"

_FORMATS: dict[str, Callable[[float], str]] = {
    "psnr": lambda v: f"{v:.2f}",
    "ssim": lambda v: f"{v:.4f}",
    "sci": lambda v: f"{v:.3g}",
    "entropy": lambda v: f"{v:.3f}",
    "int": lambda v: f"{int(v)}",
}


def _escape(text: str) -> str:
    """A pipe inside a markdown table cell must be escaped (e.g. the "|x|" of max |x|)."""
    return text.replace("|", "\\|")


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    fmt: str = "sci"  # psnr | ssim | sci | entropy | int | bool


@dataclass
class Cell:
    paper: float | None = None
    ours: float | bool | None = None
    run: str | None = None


@dataclass
class Table:
    key: str  # file stem, e.g. "table2"
    title: str
    row_header: str
    columns: list[Column] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    row_runs: dict[str, list[str]] = field(default_factory=dict)  # row -> our runs ([] = not run)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_row(self, row: str, runs: Sequence[str] = ()) -> None:
        if row not in self.rows:
            self.rows.append(row)
            self.row_runs[row] = []
        for r in runs:
            if r not in self.row_runs[row]:
                self.row_runs[row].append(r)

    def add_column(self, column: Column) -> None:
        if all(c.key != column.key for c in self.columns):
            self.columns.append(column)

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.setdefault((row, column), Cell())

    def has_paper(self, column: str | None = None) -> bool:
        return any(
            c.paper is not None for (_, k), c in self.cells.items() if column is None or k == column
        )

    def has_ours(self) -> bool:
        return any(c.ours is not None for c in self.cells.values())

    # ---- rendering

    def _ours_text(self, row: str, col: Column) -> str:
        value = self.cells.get((row, col.key), Cell()).ours
        if value is None:
            return MISSING if self.row_runs.get(row) else NOT_RUN
        if col.fmt == "bool" or isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return _FORMATS.get(col.fmt, _FORMATS["sci"])(value)

    def _paper_text(self, row: str, col: Column) -> str:
        value = self.cells.get((row, col.key), Cell()).paper
        return MISSING if value is None else f"{value:g}"

    def to_markdown(self) -> str:
        header = [self.row_header, "our run(s)"]
        for col in self.columns:
            if self.has_paper(col.key):
                header += [f"{col.label} (paper)", f"{col.label} (ours)"]
            else:
                header.append(f"{col.label} (ours)")
        lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row, ", ".join(self.row_runs.get(row) or []) or NOT_RUN]
            for col in self.columns:
                if self.has_paper(col.key):
                    cells.append(self._paper_text(row, col))
                cells.append(self._ours_text(row, col))
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
        return "\n".join(lines)

    def csv_rows(self) -> list[dict[str, object]]:
        out = []
        for row in self.rows:
            for col in self.columns:
                cell = self.cells.get((row, col.key), Cell())
                if cell.ours is not None:
                    status = "ok"
                elif not self.row_runs.get(row):
                    status = NOT_RUN
                else:
                    status = "missing"
                out.append(
                    {
                        "row": row,
                        "column": col.label,
                        "paper": cell.paper,
                        "ours": cell.ours,
                        "run": cell.run or ", ".join(self.row_runs.get(row) or []),
                        "status": status,
                    }
                )
        return out


# --------------------------------------------------------------------------------------
# Selecting runs


def runs_in_group(results: Mapping[str, RunResults], group: str) -> list[RunResults]:
    """Runs declared in `group` that have any results, ordered by norm then name."""
    found = [r for r in results.values() if group in r.info.groups and r.has_results]
    return sorted(found, key=lambda r: (norm_rank(r.info.norm), r.info.grad_clip, r.info.name))


def pick_run(
    results: Mapping[str, RunResults],
    norm: str,
    *,
    groups: Sequence[str] = (),
    task: str | None = None,
    need: Callable[[RunResults], bool] = lambda r: r.has_results,
) -> RunResults | None:
    """The most representative run of a norm: in a preferred group, no grad clipping, the
    official stdnorm pairing, lowest seed, then by name."""
    candidates = [
        r
        for r in results.values()
        if r.info.norm == norm and need(r) and (task is None or r.info.task == task)
    ]
    if not candidates:
        return None

    def rank(r: RunResults) -> tuple:
        in_group = min((i for i, g in enumerate(groups) if g in r.info.groups), default=len(groups))
        default_std = r.info.stdnorm is None or r.info.stdnorm == (norm == "iln")
        return (
            in_group,
            r.info.grad_clip > 0,
            not default_std,
            r.info.seed if r.info.seed is not None else 0,
            r.info.name,
        )

    return min(candidates, key=rank)


# --------------------------------------------------------------------------------------
# Builders


def _feature_columns(table: Table) -> None:
    table.add_column(Column("mag_deepest", "magnitude, deepest group", "sci"))
    table.add_column(Column("max_abs", "max |x|", "sci"))
    table.add_column(Column("entropy_deepest", "entropy, deepest group", "entropy"))
    table.add_column(Column("entropy_ceiling", "ceiling ln C", "entropy"))


def _fill_features(table: Table, row: str, run: RunResults) -> None:
    name = run.info.name
    table.cell(row, "mag_deepest").ours = run.final_stat("magnitude")
    table.cell(row, "max_abs").ours = run.final_max_abs()
    table.cell(row, "entropy_deepest").ours = run.final_stat("entropy")
    table.cell(row, "entropy_ceiling").ours = run.final_stat("entropy_ceiling")
    for key in ("mag_deepest", "max_abs", "entropy_deepest", "entropy_ceiling"):
        table.cell(row, key).run = name


def _set_columns(
    table: Table, sets: Sequence[str], metrics: Sequence[str] = ("psnr", "ssim")
) -> None:
    for s in sets:
        for m in metrics:
            table.add_column(Column(f"{s}:{m}", f"{s} {m.upper()}", m))


def _fill_sets(
    table: Table, row: str, run: RunResults, metrics: Sequence[str] = ("psnr", "ssim")
) -> None:
    for s in run.sets():
        for m in metrics:
            table.add_column(Column(f"{s}:{m}", f"{s} {m.upper()}", m))
            cell = table.cell(row, f"{s}:{m}")
            cell.ours = run.metric(s, m)
            cell.run = run.info.name


def _paper_sets(results_block: Mapping) -> list[str]:
    sets: list[str] = []
    for per_norm in results_block.values():
        for s in per_norm:
            if s not in sets:
                sets.append(s)
    return sets


def _paper_note(table: Table, paper_table: Mapping | None) -> None:
    if paper_table is None:
        table.notes.append(
            "Paper numbers: none recorded for this table (cells left empty, not invented)."
        )
        return
    setting = paper_table.get("setting") or {}
    where = ", ".join(f"{k} {v}" for k, v in setting.items())
    table.notes.append(
        f"Paper numbers: {paper_table['source']}" + (f" ({where})." if where else ".")
    )


def _task_note(table: Table, runs: Sequence[RunResults], paper_table: Mapping | None) -> None:
    task = ((paper_table or {}).get("setting") or {}).get("task")
    ours = sorted({r.info.task for r in runs})
    archs = sorted({r.info.arch for r in runs})
    if ours:
        table.notes.append(f"Our runs: task {', '.join(ours)}, arch {', '.join(archs)}.")
    if task and ours and ours != [task]:
        table.notes.append(
            f"Our task differs from the paper's ({task}): compare the direction of the differences, not the values."
        )


def norm_comparison_table(
    key: str,
    title: str,
    variants: Sequence[tuple[str, RunResults | None]],
    paper_table: Mapping | None,
    *,
    features: bool,
) -> Table:
    """Rows = norm variants, columns = test-set PSNR/SSIM (paper beside ours) and optionally
    the final feature statistics. variants: (norm key, our run or None)."""
    table = Table(key=key, title=title, row_header="norm")
    block = (paper_table or {}).get("results") or {}
    _set_columns(table, _paper_sets(block))
    labels = [run.info.label if run is not None else norm_label(norm) for norm, run in variants]
    row_names = []
    for (norm, run), label in zip(variants, labels, strict=True):
        row = label if labels.count(label) == 1 else f"{label} [{run.info.name if run else norm}]"
        row_names.append(row)
        table.add_row(row, [run.info.name] if run is not None else [])
        for set_name, per_metric in (block.get(norm) or {}).items():
            for metric, value in per_metric.items():
                table.add_column(
                    Column(f"{set_name}:{metric}", f"{set_name} {metric.upper()}", metric)
                )
                table.cell(row, f"{set_name}:{metric}").paper = float(value)
        if run is not None:
            _fill_sets(table, row, run)
    if features:
        _feature_columns(table)
        for (_, run), row in zip(variants, row_names, strict=True):
            if run is not None:
                _fill_features(table, row, run)
    _paper_note(table, paper_table)
    _task_note(table, [r for _, r in variants if r is not None], paper_table)
    return table


def table1(results: Mapping[str, RunResults], paper: Mapping) -> Table:
    """Every normalisation on the same preset and task (paper Table 1)."""
    paper_table = paper["tables"].get("table1")
    runs = runs_in_group(results, "table1")
    variants: list[tuple[str, RunResults | None]] = [(r.info.norm, r) for r in runs]
    for norm in (paper_table or {}).get("results", {}):
        if all(n != norm for n, _ in variants):
            variants.append((norm, None))
    return norm_comparison_table(
        "table1",
        "Table 1: normalisation layers compared (final PSNR/SSIM and feature statistics)",
        variants,
        paper_table,
        features=True,
    )


def table2(results: Mapping[str, RunResults], paper: Mapping) -> Table:
    """LN vs InstanceNorm vs i-LN on the SR benchmarks (paper Table 2)."""
    paper_table = paper["tables"].get("table2")

    def sr(r: RunResults) -> bool:
        return r.has_results and r.info.task.startswith("sr_")

    variants = [
        (n, pick_run(results, n, groups=("table1",), need=sr))
        for n in ("ln", "instancenorm", "iln")
    ]
    return norm_comparison_table(
        "table2", "Table 2: LN vs InstanceNorm vs i-LN", variants, paper_table, features=False
    )


def table3(results: Mapping[str, RunResults], paper: Mapping) -> Table:
    """Ablation LN, LN*, LN+Rs, i-LN (paper Table 3)."""
    paper_table = paper["tables"].get("table3")
    variants = [
        (
            n,
            pick_run(
                results,
                n,
                groups=("table3",),
                need=lambda r: "table3" in r.info.groups and r.has_results,
            ),
        )
        for n in ("ln", "ln_star", "ln_rs", "iln")
    ]
    return norm_comparison_table(
        "table3",
        "Table 3: holistic normalisation (LN*) and input-adaptive rescaling (Rs) ablated",
        variants,
        paper_table,
        features=True,
    )


def table4(results: Mapping[str, RunResults], paper: Mapping) -> Table:
    """PSNR and overflow per inference precision, LN vs i-LN (paper Table 4)."""
    paper_table = paper["tables"].get("table4")
    block = (paper_table or {}).get("results") or {}
    table = Table(
        key="table4",
        title="Table 4: inference precision (PSNR, overflow)",
        row_header="norm / precision",
    )
    runs = [r for r in runs_in_group(results, "table4") if r.precision]
    seen_norms = set()
    for run in runs:
        seen_norms.add(run.info.norm)
        modes = sorted(
            run.precision, key=lambda m: PRECISION_MODES.index(m) if m in PRECISION_MODES else 99
        )
        for mode in modes:
            row = f"{run.info.label} / {mode}"
            table.add_row(row, [run.info.name])
            for set_name, entry in run.precision[mode].items():
                table.add_column(Column(f"{set_name}:psnr", f"{set_name} PSNR", "psnr"))
                table.add_column(Column(f"{set_name}:overflow", f"{set_name} overflow", "bool"))
                table.cell(row, f"{set_name}:psnr").ours = entry["psnr"]
                table.cell(row, f"{set_name}:overflow").ours = entry["overflow"]
                table.cell(row, f"{set_name}:psnr").run = run.info.name
            for set_name, per_metric in (block.get(run.info.norm, {}).get(mode) or {}).items():
                for metric, value in per_metric.items():
                    table.add_column(
                        Column(f"{set_name}:{metric}", f"{set_name} {metric.upper()}", metric)
                    )
                    table.cell(row, f"{set_name}:{metric}").paper = float(value)
    for norm, per_mode in block.items():
        if norm in seen_norms:
            continue
        for mode, per_set in per_mode.items():
            row = f"{norm_label(norm)} / {mode}"
            table.add_row(row)
            for set_name, per_metric in per_set.items():
                for metric, value in per_metric.items():
                    table.add_column(
                        Column(f"{set_name}:{metric}", f"{set_name} {metric.upper()}", metric)
                    )
                    table.cell(row, f"{set_name}:{metric}").paper = float(value)
    _paper_note(table, paper_table)
    table.notes.append(
        "The paper reports i-LN unchanged under fp16; it gives no separate number for it here."
    )
    table.notes.append(
        "Overflow: any non-finite value in the low-precision forward pass (as reported by the evaluation)."
    )
    return table


def _family(arch: str) -> str:
    return "swinir" if arch.startswith("swinir") else "hat"


def table6(results: Mapping[str, RunResults], paper: Mapping) -> Table:
    """LN vs i-LN on other tasks and models (the paper's rows beyond x4 SR with HAT_1)."""
    paper_table = paper["tables"].get("table6")
    table = Table(
        key="table6",
        title="Table 6: other tasks and models, LN vs i-LN (PSNR)",
        row_header="task / set",
    )
    for col in (
        Column("ln", "LN PSNR", "psnr"),
        Column("iln", "i-LN PSNR", "psnr"),
        Column("gain", "i-LN − LN (dB)", "psnr"),
    ):
        table.add_column(col)

    def ours_for(task: str, set_name: str, arch: str | None, norm: str) -> RunResults | None:
        cands = [
            r
            for r in results.values()
            if r.info.norm == norm
            and r.info.task == task
            and r.metric(set_name, "psnr") is not None
            and (arch is None or _family(r.info.arch) == _family(arch))
        ]
        return (
            min(cands, key=lambda r: (r.info.arch != arch, r.info.grad_clip > 0, r.info.name))
            if cands
            else None
        )

    def fill(row: str, task: str, set_name: str, arch: str | None) -> None:
        runs = {n: ours_for(task, set_name, arch, n) for n in ("ln", "iln")}
        table.add_row(row, [r.info.name for r in runs.values() if r is not None])
        for norm, run in runs.items():
            if run is not None:
                table.cell(row, norm).ours = run.metric(set_name, "psnr")
                table.cell(row, norm).run = run.info.name
        a, b = table.cell(row, "ln").ours, table.cell(row, "iln").ours
        if a is not None and b is not None:
            table.cell(row, "gain").ours = b - a

    covered = set()
    for prow in (paper_table or {}).get("rows", []):
        label = f"{prow['task']} / {prow['set']}" + (
            f" ({prow['arch']})" if prow.get("arch") else ""
        )
        if prow.get("note"):
            label += f" [{prow['note']}]"
        fill(label, prow["task"], prow["set"], prow.get("arch"))
        for norm in ("ln", "iln"):
            if norm in prow and "psnr" in prow[norm]:
                table.cell(label, norm).paper = float(prow[norm]["psnr"])
        if "ln" in prow and "iln" in prow:
            table.cell(label, "gain").paper = round(
                float(prow["iln"]["psnr"]) - float(prow["ln"]["psnr"]), 6
            )
        covered.add((prow["task"], prow["set"]))
    for run in sorted(results.values(), key=lambda r: r.info.name):
        if run.info.task.startswith("sr_") or run.info.norm not in ("ln", "iln"):
            continue
        for set_name in run.sets():
            if (run.info.task, set_name) not in covered:
                covered.add((run.info.task, set_name))
                fill(f"{run.info.task} / {set_name}", run.info.task, set_name, None)
    _paper_note(table, paper_table)
    table.notes.append(
        "Ours: any run with the row's task and norm (same model family when the paper names one)."
    )
    return table


def table8(results: Mapping[str, RunResults], paper: Mapping) -> Table:
    """Max |x| for LN, LN with gradient clipping, and i-LN (paper Table 8)."""
    paper_table = paper["tables"].get("table8")
    block = (paper_table or {}).get("results") or {}
    table = Table(
        key="table8",
        title="Table 8: gradient clipping vs feature divergence (max |x|)",
        row_header="variant",
    )
    table.add_column(Column("max_abs", "max |x| (final)", "sci"))
    table.add_column(Column("max_abs_training", "max |x| (during training)", "sci"))
    table.add_column(Column("mag_deepest", "magnitude, deepest group", "sci"))
    table.add_column(Column("entropy_deepest", "entropy, deepest group", "entropy"))

    def paper_key(norm: str, clip: float) -> str:
        return f"{norm}_gradclip" if clip > 0 else norm

    runs = runs_in_group(results, "table8")
    seen = set()
    for run in runs:
        row = (
            run.info.label
            if sum(r.info.label == run.info.label for r in runs) == 1
            else f"{run.info.label} [{run.info.name}]"
        )
        table.add_row(row, [run.info.name])
        key = paper_key(run.info.norm, run.info.grad_clip)
        seen.add(key)
        if "max_abs" in block.get(key, {}):
            table.cell(row, "max_abs").paper = float(block[key]["max_abs"])
        table.cell(row, "max_abs").ours = run.final_max_abs()
        table.cell(row, "max_abs_training").ours = run.training_max_abs()
        table.cell(row, "mag_deepest").ours = run.final_stat("magnitude")
        table.cell(row, "entropy_deepest").ours = run.final_stat("entropy")
    for key, values in block.items():
        if key in seen:
            continue
        norm = key.removesuffix("_gradclip")
        row = norm_label(norm) + (" + grad clip" if key.endswith("_gradclip") else "")
        table.add_row(row)
        if "max_abs" in values:
            table.cell(row, "max_abs").paper = float(values["max_abs"])
    _paper_note(table, paper_table)
    return table


def stdnorm_table(results: Mapping[str, RunResults]) -> Table:
    """Ours: the input-standardisation confound (LN / i-LN x stdnorm on / off)."""
    table = Table(
        key="table_s1_stdnorm",
        title="Table S1 (ours, not in the paper): input standardisation (stdnorm) on/off, LN and i-LN",
        row_header="norm / stdnorm",
    )
    for run in runs_in_group(results, "stdnorm"):
        row = f"{norm_label(run.info.norm)} / stdnorm {'on' if run.info.stdnorm_on else 'off'}"
        if row in table.rows:
            row = f"{row} [{run.info.name}]"
        table.add_row(row, [run.info.name])
        _fill_sets(table, row, run)
        _feature_columns(table)
        _fill_features(table, row, run)
    table.notes.append(
        "The official i-LN configs standardise the input (stdnorm) and the official LN baselines do not; "
        "this table separates that switch from the normalisation itself."
    )
    return table


def runs_table(results: Mapping[str, RunResults], group: str, key: str, title: str) -> Table:
    """Ours: one row per run of a group (seeds, batch size), PSNR/SSIM and features."""
    table = Table(key=key, title=title, row_header="run")
    for run in runs_in_group(results, group):
        extra = []
        if run.info.seed is not None:
            extra.append(f"seed {run.info.seed}")
        if run.info.batch_size is not None:
            extra.append(f"batch {run.info.batch_size}")
        row = f"{run.info.label} ({', '.join(extra)})" if extra else run.info.label
        if row in table.rows:
            row = f"{row} [{run.info.name}]"
        table.add_row(row, [run.info.name])
        _fill_sets(table, row, run)
        _feature_columns(table)
        _fill_features(table, row, run)
    return table


def all_runs_table(results: Mapping[str, RunResults]) -> Table:
    """Ours: every declared run with its setting, final features and PSNR."""
    table = Table(key="runs", title="All runs", row_header="run")
    table.add_column(Column("iterations", "iterations", "int"))
    table.add_column(Column("last_step", "last probed/logged step", "int"))
    table.add_column(Column("sec_per_step", "s/step", "sci"))
    for run in results.values():
        table.add_row(
            f"{run.info.name}: {run.info.arch} {run.info.label} {run.info.task}",
            [run.info.name] if run.has_results else [],
        )
    for run, row in zip(results.values(), table.rows, strict=True):
        if not run.has_results:
            continue
        table.cell(row, "iterations").ours = run.info.iterations
        table.cell(row, "last_step").ours = run.last_step()
        table.cell(row, "sec_per_step").ours = run.mean_seconds_per_step()
        _fill_sets(table, row, run, metrics=("psnr",))
    _feature_columns(table)
    for run, row in zip(results.values(), table.rows, strict=True):
        if run.has_results:
            _fill_features(table, row, run)
    return table
