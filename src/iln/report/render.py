"""The report's one table model: rows x columns of cells, each cell holding the paper's value
and ours. Every table of the report (the paper's, ours, the released checkpoints') is one,
rendered by one markdown renderer (a "(paper)" and an "(ours)" sub-column wherever both
exist, split into parts that fit a page) and written by one long-format CSV writer
(row, column, paper, ours, run, status).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iln.util.files import write_csv_atomic, write_text_atomic
from iln.report.paper import printed

CSV_COLUMNS: tuple[str, ...] = ("row", "column", "paper", "ours", "run", "status")
NO_RUN = "no run"
MISSING = "–"
MAX_VALUE_COLUMNS = 8  # printed value columns per markdown table part (beside the row names)

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

    def ours_text(self, row: str, col: Column) -> str:
        value = self.cells.get((row, col.key), Cell()).ours
        if value is None:
            return MISSING if self.row_runs.get(row) else NO_RUN
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, str):
            return FORMATS["digest"](value) if col.fmt == "digest" else value
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return str(value)
        return FORMATS.get(col.fmt, FORMATS["sci"])(value)

    def paper_text(self, row: str, col: Column) -> str:
        value = self.cells.get((row, col.key), Cell()).paper
        return MISSING if value is None else printed(value)


def pipe_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown pipe table; a pipe inside a cell (the "|x|" of max |x|) is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def _part(table: Table, columns: Sequence[Column]) -> list[str]:
    header = [table.row_header, "our run(s)"]
    rows = [[row, ", ".join(table.row_runs.get(row) or []) or NO_RUN] for row in table.rows]
    for col in columns:
        paper, ours = table.shown(col)
        header += [f"{col.label} (paper)"] * paper + [f"{col.label} (ours)"] * ours
        for row, cells in zip(table.rows, rows, strict=True):
            cells += [table.paper_text(row, col)] * paper + [table.ours_text(row, col)] * ours
    return pipe_table(header, rows)


def to_markdown(table: Table) -> list[str]:
    """The table as markdown; one wider than MAX_VALUE_COLUMNS printed value columns is
    split into parts (a column's paper and ours sub-columns together, each part repeating
    the row names), so each fits a page."""
    parts: list[list[Column]] = [[]]
    for col in table.columns:
        width = [sum(table.shown(c)) for c in parts[-1]]
        if parts[-1] and sum(width) + sum(table.shown(col)) > MAX_VALUE_COLUMNS:
            parts.append([])
        parts[-1].append(col)
    if len(parts) == 1:
        return _part(table, parts[0])
    out: list[str] = []
    for i, columns in enumerate(parts, 1):
        out += [f"*Part {i} of {len(parts)}.*", "", *_part(table, columns), ""]
    return out[:-1]


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
