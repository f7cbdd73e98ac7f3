"""The report: every table (markdown + CSV), the figures, and report.md that links them."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from iln.files import write_csv_atomic, write_text_atomic
from iln.report import figures, tables
from iln.report.paper import load_paper_numbers
from iln.report.released import released_section
from iln.report.runs import RunResults, load_runs
from iln.report.tables import TABLE_CSV_COLUMNS, Table


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def run_summary(run: RunResults) -> dict[str, object]:
    """Final numbers of one run (finite floats only, so the dict is valid JSON)."""
    out: dict[str, object] = {
        "deepest_magnitude": _finite(run.final_stat("magnitude")),
        "deepest_entropy": _finite(run.final_stat("entropy")),
        "entropy_ceiling": _finite(run.final_stat("entropy_ceiling")),
        "max_abs": _finite(run.final_max_abs()),
        "max_abs_training": _finite(run.training_max_abs()),
        "psnr": {s: v for s in run.sets() if (v := _finite(run.metric(s, "psnr"))) is not None},
        "ssim": {s: v for s in run.sets() if (v := _finite(run.metric(s, "ssim"))) is not None},
    }
    return {k: v for k, v in out.items() if v not in (None, {})}


def flatten_summary(summary: Mapping[str, object]) -> dict[str, float]:
    """{"<run>/deepest_magnitude": .., "<run>/psnr/<set>": ..} for metric loggers."""
    flat: dict[str, float] = {}
    for run, values in (summary.get("runs") or {}).items():
        for key, value in values.items():
            if isinstance(value, Mapping):
                for sub, number in value.items():
                    flat[f"{run}/{key}/{sub}"] = float(number)
            else:
                flat[f"{run}/{key}"] = float(value)
    return flat


def _scale_lines(results: Mapping[str, RunResults], scale_note: str) -> list[str]:
    done = [r for r in results.values() if r.has_results]

    def values(get: Callable[[RunResults], object]) -> str:
        found = sorted({str(v) for r in done if (v := get(r)) is not None})
        return ", ".join(found) if found else "–"

    speeds = [s for r in done if (s := r.mean_seconds_per_step()) is not None]
    lines = [
        f"> **Scale of these results: {scale_note}**",
        ">",
        f"> Runs with results: {len(done)} of {len(results)} declared; "
        f"arch {values(lambda r: r.info.arch)}; task {values(lambda r: r.info.task)}; "
        f"iterations {values(lambda r: r.info.iterations)}; batch {values(lambda r: r.info.batch_size)}"
        + (f"; mean {sum(speeds) / len(speeds):.3g} s per training step." if speeds else "."),
        ">",
        "> The paper's numbers come from full-scale GPU training (HAT_1: 300K iterations on DF2K, "
        "x4 SR, batch 16). Numbers from a smaller preset, fewer iterations or other data are not "
        "comparable in absolute value: compare directions and trends (LN's magnitude growing and "
        "entropy falling in deep groups, i-LN flat near the ceiling), not digits.",
    ]
    return lines


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def build_report(
    runs: Mapping[str, object],
    runs_dir: Path | str,
    out_dir: Path | str,
    *,
    scale_note: str,
    paper: Mapping | None = None,
    sets: Sequence[str] | None = None,
    released: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Write out_dir/report.md, out_dir/tables/<table>.{md,csv} and out_dir/figures/*.png.

    runs: run name -> a RunSpec-like object (attributes arch, norm, task, stdnorm,
      affine_outer, grad_clip, seed, batch_size, iterations, groups), a resolved run
      (attributes `spec` and `train`: unset spec fields fall back to `train`), or a mapping.
    runs_dir: folder with one folder per run (train/, eval/, analysis/ per contract).
    scale_note: what scale this ran at (preset, iterations, data, device), shown first.
    paper: the paper numbers (default: the packaged paper_numbers.yaml).
    sets: our test sets to show, in order (default: every set in metrics.json).
    released: the `released:` entries (the authors' checkpoints), shown in their own section.
    Returns {"runs": {name: final numbers}, "tables": {key: status}, "figures": {name: status}}.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    paper = load_paper_numbers() if paper is None else paper
    results = load_runs(runs, runs_dir, sets=sets)

    built: list[tuple[Table, str]] = [
        (tables.table1(results, paper), "table1"),
        (tables.table2(results, paper), "table1 (any SR run)"),
        (tables.table3(results, paper), "table3"),
        (tables.table4(results, paper), "table4"),
        (tables.table6(results, paper), "any non-SR task"),
        (tables.table8(results, paper), "table8"),
        (tables.stdnorm_table(results), "stdnorm"),
        (tables.runs_table(results, "seeds", "table_s2_seeds", "Table S2 (ours): seeds"), "seeds"),
        (
            tables.runs_table(results, "batch", "table_s3_batch", "Table S3 (ours): batch size"),
            "batch",
        ),
        (tables.all_runs_table(results), "any"),
    ]
    status: dict[str, str] = {}
    md: list[str] = [
        "# i-LN reproduction report",
        "",
        *_scale_lines(results, scale_note),
        "",
        "## Tables",
        "",
    ]
    for table, group in built:
        if not table.has_ours() and not table.has_paper():
            status[table.key] = f"skipped: no results from runs in group {group}"
            md += [
                f"### {table.title}",
                "",
                f"Skipped: no results from runs in group `{group}` and no paper numbers.",
                "",
            ]
            continue
        body = [table.to_markdown(), ""] + [f"- {note}" for note in table.notes]
        write_text_atomic(
            tables_dir / f"{table.key}.md", "\n".join([f"# {table.title}", "", *body, ""])
        )
        write_csv_atomic(tables_dir / f"{table.key}.csv", table.csv_rows(), TABLE_CSV_COLUMNS)
        status[table.key] = "written" if table.has_ours() else "paper only (not run)"
        md += [
            f"### {table.title}",
            "",
            *body,
            f"- CSV: [tables/{table.key}.csv](tables/{table.key}.csv)",
            "",
        ]

    # ---- figures
    feats = paper.get("features", {})
    ln = tables.pick_run(results, "ln", groups=("table1",), need=lambda r: bool(r.probes))
    iln = tables.pick_run(results, "iln", groups=("table1",), need=lambda r: bool(r.probes))
    plans: dict[str, tuple[Callable[[Path], Path | None], str]] = {
        "fig1_magnitude_entropy": (
            lambda p: figures.fig1_magnitude_entropy([("LN", ln), ("i-LN", iln)], p),
            "Fig. 1 style: magnitude (log) and channel entropy of every group over training, LN vs i-LN."
            + (
                f" Paper (HAT_1, x4, 300K iterations): LN reaches {feats['ln_magnitude_low']:g} to "
                f"{feats['ln_magnitude_high']:g}, i-LN stays near {feats['iln_magnitude_approx']:g}; "
                f"entropy ceiling ln 96 = {feats['entropy_ceiling_c96']:g}."
                if {
                    "ln_magnitude_low",
                    "ln_magnitude_high",
                    "iln_magnitude_approx",
                    "entropy_ceiling_c96",
                }
                <= set(feats)
                else ""
            ),
        ),
        "fig4_magnitude_by_norm": (
            lambda p: figures.deepest_curves(
                tables.runs_in_group(results, "table1"),
                p,
                title="Deepest group, every normalisation (Table 1 runs)",
            ),
            "Fig. 4 style: deepest-group magnitude (log) and entropy over training for every normalisation.",
        ),
        "fig7_entropy_ablation": (
            lambda p: figures.fig7_entropy_ablation(tables.runs_in_group(results, "table3"), p),
            "Fig. 7 style: channel entropy for the LN / LN* / LN+Rs / i-LN ablation.",
        ),
        "figS1_stdnorm": (
            lambda p: figures.deepest_curves(
                tables.runs_in_group(results, "stdnorm"),
                p,
                title="Deepest group, stdnorm on/off (ours)",
            ),
            "Ours: deepest-group magnitude and entropy with input standardisation on and off.",
        ),
    }
    fig_status: dict[str, str] = {}
    md += ["## Figures", ""]
    for name, (make, caption) in plans.items():
        if make(figures_dir / f"{name}.png") is None:
            fig_status[name] = "skipped: no probes"
            md += [f"- {name}: skipped (no runs with probes.csv).", ""]
        else:
            fig_status[name] = "written"
            md += [f"### {name}", "", caption, "", f"![{name}](figures/{name}.png)", ""]

    # ---- per-run final analyses (Fig. 8, 9)
    with_figs = [r for r in results.values() if r.figures]
    md += [
        "## Final-checkpoint analyses (Fig. 8: final-norm bias, Fig. 9: relative position bias)",
        "",
    ]
    if with_figs:
        md += ["| run | final norm | rpb, first group | rpb, last group |", "|---|---|---|---|"]
        for run in with_figs:
            links = [
                f"[{n}]({_rel(run.figures[n], out_dir)})" if n in run.figures else "–"
                for n in ("final_norm.png", "rpb_first.png", "rpb_last.png")
            ]
            md.append(f"| {run.info.name} ({run.info.label}) | " + " | ".join(links) + " |")
        md.append("")
    else:
        md += ["Skipped: no run has analysis figures yet.", ""]

    md += released_section(released or {}, runs_dir, out_dir, paper)
    md += ["## Where the paper's numbers come from", "", f"Paper: {paper['paper']}.", ""]
    md += [f"- {key}: {table['source']}" for key, table in paper["tables"].items()]
    if "features" in paper:
        md.append(f"- features: {paper['features']['source']}")
    md.append("")
    write_text_atomic(out_dir / "report.md", "\n".join(md))

    return {
        "runs": {name: run_summary(run) for name, run in results.items() if run.has_results},
        "tables": status,
        "figures": fig_status,
    }
