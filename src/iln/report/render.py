"""The report's one table model: rows x columns of cells, each cell holding the paper's value
and ours. Every table of the report (the paper's, ours, the released checkpoints') is one,
rendered by one markdown renderer and written by one long-format CSV writer (row, column,
paper, ours, run, status).

The markdown keeps the paper's number and ours in the same row, in adjacent columns: a
"(paper)" and an "(ours)" sub-column wherever both exist; the paper's numbers on sets we did
not run merged into one cell per metric ("28.79 / 27.68 / 26.55"), right before ours; a
column of ours with one value in every row said once under the table instead; split into
parts only where still wider than a page.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iln.report.paper import printed
from iln.util.files import write_csv_atomic, write_text_atomic

CSV_COLUMNS: tuple[str, ...] = ("row", "column", "paper", "ours", "run", "status")
NO_RUN = "no run"  # the "our run(s)" cell of a row no run of ours fills (its other cells: blank)
MISSING = "–"
MAX_VALUE_COLUMNS = 10  # printed value columns per markdown table part (beside the row names)
CONSTANT_ROWS = 3  # a column of ours with one value in this many rows or more: said once
MERGED_METRICS = ("psnr", "ssim")  # the paper's numbers of these on sets we did not run: one cell

FORMATS = {
    "psnr": lambda v: f"{v:.2f}",
    "ssim": lambda v: f"{v:.4f}",
    "sci": lambda v: f"{v:.3g}",
    "entropy": lambda v: f"{v:.3f}",
    "int": lambda v: f"{int(v)}",
    "digest": lambda v: v[:12],  # a SHA-256: its first 12 hex digits (all of it in the CSV)
}


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    fmt: str = "sci"  # a key of FORMATS, bool or text
    always_ours: bool = False  # show our sub-column even where no run fills it ("no run")


@dataclass
class Cell:
    paper: float | str | None = None
    ours: float | bool | str | None = None
    run: str | None = None


@dataclass
class Table:
    key: str  # file stem, e.g. "table2" (the paper's Table 2) or "table_s1_stdnorm" (ours)
    title: str  # "Table 2: LN vs i-LN across tasks and models"
    caption: str  # one sentence: what the table shows
    row_header: str
    measured: list[str] = field(default_factory=list)  # what our numbers were measured on
    paper_source: str | None = None
    columns: list[Column] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    row_runs: dict[str, list[str]] = field(default_factory=dict)  # row -> our runs ([] = none)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    marks: dict[tuple[str, str], str] = field(default_factory=dict)  # (row, column) -> a
    # remark printed after our value in that cell, e.g. "below bicubic 33.57"
    filled_by: str | None = None  # which runs would fill it (a config overlay), for the
    # one line the report prints while no run of ours does
    psnr_ssim_cells: bool = False  # print "<x>:psnr" and "<x>:ssim" as one "PSNR / SSIM" cell

    def add_row(self, row: str, runs: Sequence[str] = ()) -> None:
        if row not in self.rows:
            self.rows.append(row)
            self.row_runs[row] = []
        self.row_runs[row] += [r for r in runs if r not in self.row_runs[row]]

    def add_column(self, column: Column) -> None:
        if all(c.key != column.key for c in self.columns):
            self.columns.append(column)

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.setdefault((row, column), Cell())

    def set_ours(self, row: str, column: Column, value: object, run: str) -> None:
        self.add_column(column)
        cell = self.cell(row, column.key)
        cell.ours, cell.run = value, run

    def set_paper(self, row: str, column: Column, value: float | str) -> None:
        self.add_column(column)
        self.cell(row, column.key).paper = value

    def has_ours(self, column: str | None = None) -> bool:
        return any(
            c.ours is not None for (_, k), c in self.cells.items() if column is None or k == column
        )

    def shown(self, col: Column) -> tuple[bool, bool]:
        """(show the paper's sub-column, show ours): ours is left out only where the paper
        has numbers and no run of ours has any."""
        paper = any(c.paper is not None for (_, k), c in self.cells.items() if k == col.key)
        return paper, col.always_ours or self.has_ours(col.key) or not paper

    def ours_text(self, row: str, col: Column, marked: bool = True) -> str:
        value = self.cells.get((row, col.key), Cell()).ours
        if value is None:  # a row without a run says so once, in its "our run(s)" cell
            return MISSING if self.row_runs.get(row) else ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, str):
            return FORMATS["digest"](value) if col.fmt == "digest" else value
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return str(value)
        text = FORMATS.get(col.fmt, FORMATS["sci"])(value)
        mark = self.marks.get((row, col.key)) if marked else None
        return f"{text} ({mark})" if mark else text

    def paper_text(self, row: str, col: Column) -> str:
        value = self.cells.get((row, col.key), Cell()).paper
        return MISSING if value is None else printed(value)


def pipe_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown pipe table; a pipe inside a cell (the "|x|" of max |x|) is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


@dataclass(frozen=True)
class Printed:
    """One printed markdown column: its header and its text in each row."""

    header: str
    text: Callable[[str], str]
    group: str  # columns of one group stay in one part (a column's paper and ours)


def constant_column(table: Table, col: Column) -> str | None:
    """Our one value of a column with no paper numbers whose every filled row has the same
    text, in CONSTANT_ROWS rows or more (None otherwise)."""
    if table.shown(col)[0]:
        return None
    filled = [r for r in table.rows if table.cells.get((r, col.key), Cell()).ours is not None]
    texts = {table.ours_text(r, col) for r in filled}
    return texts.pop() if len(filled) >= CONSTANT_ROWS and len(texts) == 1 else None


def _joined(texts: Sequence[str]) -> str:
    """ "28.79 / 27.68 / –", or "–" where every one is missing."""
    return MISSING if all(t == MISSING for t in texts) else " / ".join(texts)


def _metric(col: Column) -> str | None:
    """psnr / ssim of a per-set column ("Set14:psnr"), else None."""
    metric = col.key.rpartition(":")[2]
    return metric if ":" in col.key and metric in MERGED_METRICS else None


def printed_columns(table: Table) -> tuple[list[Printed], list[str]]:
    """The printed columns in order and the notes that replace the constant ones: the
    paper's numbers of one metric on sets where no run of ours has any, merged into one
    column (where there are two such sets or more) where the first of them was, followed by
    every column of ours of that metric; every other column as its "(paper)" and "(ours)"
    sub-columns."""
    paper_only: dict[str, list[Column]] = {}
    for col in table.columns:
        if (metric := _metric(col)) and table.shown(col) == (True, False):
            paper_only.setdefault(metric, []).append(col)
    paper_only = {m: cols for m, cols in paper_only.items() if len(cols) >= 2}
    out: list[Printed] = []
    notes: list[str] = []
    placed: set[str] = set()

    def merged(metric: str) -> None:
        cols = paper_only[metric]
        sets = " / ".join(c.label.rpartition(" ")[0] for c in cols)
        out.append(
            Printed(
                f"{metric.upper()} (paper): {sets}",
                lambda row: _joined([table.paper_text(row, c) for c in cols]),
                f"paper:{metric}",
            )
        )
        placed.add(metric)

    def sub(label: str, text: Callable[[Column, str], str], col: Column) -> Printed:
        return Printed(f"{col.label} ({label})", lambda row: text(col, row), col.key)

    ssim = {c.key.removesuffix(":ssim"): c for c in table.columns if c.key.endswith(":ssim")}
    paired = {
        c.key: ssim[base]
        for c in table.columns
        if table.psnr_ssim_cells and (base := c.key.removesuffix(":psnr")) != c.key and base in ssim
    }

    def both(col: Column, other: Column, side: str, row: str) -> str:
        if side == "paper":
            texts = [table.paper_text(row, col), table.paper_text(row, other)]
            return _joined(texts)
        texts = [table.ours_text(row, col, marked=False), table.ours_text(row, other)]
        if not any(texts):
            return ""
        mark = table.marks.get((row, col.key))
        return _joined(texts) + (f" ({mark})" if mark else "")

    def emit(col: Column) -> None:
        if col in paired.values():  # printed beside its PSNR
            return
        if col.key in paired:
            other = paired[col.key]
            label = f"{col.label.removesuffix(' PSNR')} PSNR / SSIM"
            for side, shown in zip(("paper", "ours"), table.shown(col), strict=True):
                if shown:
                    text = functools.partial(both, col, other, side)
                    out.append(Printed(f"{label} ({side})", text, col.key))
            return
        if (value := constant_column(table, col)) is not None:
            notes.append(f"{col.label} (ours): {value} in every row with a run.")
            return
        paper, ours = table.shown(col)
        if paper:
            out.append(sub("paper", lambda c, row: table.paper_text(row, c), col))
        if ours:
            out.append(sub("ours", lambda c, row: table.ours_text(row, c), col))

    for col in table.columns:
        metric = _metric(col)
        if metric not in paper_only:
            emit(col)
        elif metric not in placed:  # the paper's merged cell, then every column of ours of it
            merged(metric)
            for other in table.columns:
                if _metric(other) == metric and other not in paper_only[metric]:
                    emit(other)
    return out, notes


def _part(table: Table, columns: Sequence[Printed]) -> list[str]:
    header = [table.row_header, "our run(s)", *(c.header for c in columns)]
    rows = [
        [row, ", ".join(table.row_runs.get(row) or []) or NO_RUN, *(c.text(row) for c in columns)]
        for row in table.rows
    ]
    return pipe_table(header, rows)


def to_markdown(table: Table) -> list[str]:
    """The table as markdown (printed_columns), then the notes of its constant columns; one
    wider than MAX_VALUE_COLUMNS printed value columns is split into as few parts of about
    equal width as fit (each part repeating the row names; a column's "(paper)" and "(ours)"
    always in one part), so each fits a page."""
    columns, notes = printed_columns(table)
    count = math.ceil(len(columns) / MAX_VALUE_COLUMNS) if columns else 1
    width = math.ceil(len(columns) / count)  # parts of about equal width, not one stub
    parts: list[list[Printed]] = []
    for group in dict.fromkeys(c.group for c in columns):
        members = [c for c in columns if c.group == group]
        if not parts or len(parts[-1]) + len(members) > max(width, len(members)):
            parts.append([])
        parts[-1] += members
    tail = ["", *(f"- {note}" for note in notes)] if notes else []
    if len(parts) <= 1:
        return [*_part(table, parts[0] if parts else []), *tail]
    out: list[str] = []
    for i, part in enumerate(parts, 1):
        out += [f"*Part {i} of {len(parts)}.*", "", *_part(table, part), ""]
    return [*out[:-1], *tail]


def csv_rows(table: Table) -> list[dict[str, object]]:
    out = []
    for row in table.rows:
        runs = ", ".join(table.row_runs.get(row) or [])
        for col in table.columns:
            cell = table.cells.get((row, col.key), Cell())
            status = "ok" if cell.ours is not None else "missing" if runs else NO_RUN
            out.append(
                {
                    "row": row,
                    "column": col.label,
                    "paper": None if cell.paper is None else printed(cell.paper),
                    "ours": cell.ours,
                    "run": cell.run or runs,
                    "status": status,
                }
            )
    return out


def write_table(table: Table, tables_dir: Path) -> list[str]:
    """Write tables_dir/<key>.{md,csv}; return the table's section of report.md."""
    body = [f"*What it shows:* {table.caption}"]
    body += ["", "*Ours measured on:* " + " ".join(table.measured)] if table.measured else []
    body += ["", f"*Paper:* {table.paper_source}"] if table.paper_source else []
    body += ["", *to_markdown(table), "", *(f"- {note}" for note in table.notes)]
    write_text_atomic(tables_dir / f"{table.key}.md", "\n".join([f"# {table.title}", "", *body]))
    write_csv_atomic(tables_dir / f"{table.key}.csv", csv_rows(table), CSV_COLUMNS)
    link = f"- CSV: [tables/{table.key}.csv](tables/{table.key}.csv)"
    return [f"### {table.title}", "", *body, link, ""]
