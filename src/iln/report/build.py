"""The report: every table (markdown + CSV), the figures, and report.md that links them."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from iln.config.layout import ANALYSIS_FIGURES, WEIGHTS_RAW, RunFiles
from iln.figures.styles import norm_label, norm_rank, norm_style
from iln.report import dynamics, figures, tables
from iln.report.crops import comparison_panels
from iln.report.html import markdown_to_html
from iln.report.paper import load_paper_numbers
from iln.report.render import pipe_table, write_table
from iln.report.runs import RunInfo, RunResults, load_runs, read_metrics
from iln.report.tables import MeasuredOn
from iln.util.files import write_text_atomic


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def run_summary(run: RunResults) -> dict[str, object]:
    """Final numbers of one run (finite floats only, so the dict is valid JSON)."""
    start = dynamics.deepest_change(run, "magnitude")
    final = {
        **run.deepest(),
        "deepest_magnitude_start": start.first if start else None,  # at the first probe
        "first_probe_step": start.first_step if start else None,
        "max_abs_raw": run.final_max_abs(WEIGHTS_RAW),
        "max_abs_training": run.training_max_abs(),
        "last_probe_step": run.last_probe_step(),
    }
    out: dict[str, object] = {k: f for k, v in final.items() if (f := _finite(v)) is not None}
    for metric in ("psnr", "ssim"):
        per_set = {s: f for s in run.sets() if (f := _finite(run.metric(s, metric))) is not None}
        out |= {metric: per_set} if per_set else {}
    return out


METRICS_ROW_KEYS: tuple[str, ...] = ("psnr", "ssim", "magnitude", "entropy", "step")


def metrics_rows(
    results: Mapping[str, RunResults], baseline: tables.Baseline | None
) -> dict[str, dict[str, float]]:
    """One small dict per run for `dvc metrics show` (reports/metrics/<name>.json), all with
    the keys of METRICS_ROW_KEYS that the run has: PSNR and SSIM on its first report set, the
    deepest group's final magnitude and entropy (raw weights) and its last step. The
    baseline has one row per task (``bicubic_<task>``), PSNR and SSIM only."""
    rows: dict[str, dict[str, float]] = {}
    for name, run in results.items():
        if not run.has_results:
            continue
        summary, first = run_summary(run), next(iter(run.sets()), None)
        values = {
            "psnr": summary.get("psnr", {}).get(first),
            "ssim": summary.get("ssim", {}).get(first),
            "magnitude": summary.get("deepest_magnitude_raw"),
            "entropy": summary.get("deepest_entropy_raw"),
            "step": _finite(run.last_step()),
        }
        rows[name] = {k: v for k, v in values.items() if v is not None}
    tasks = list(dict.fromkeys(r.info.task for r in results.values() if r.has_results))
    for task in tasks if baseline else ():
        first = next((s for r in results.values() if r.info.task == task for s in r.sets()), None)
        entry = (baseline or {}).get(f"{task}/{first}") or {}
        found = {m: f for m in ("psnr", "ssim") if (f := _finite(entry.get(m))) is not None}
        if found:
            rows[f"{tables.BASELINE_RUN}_{task}"] = found
    return rows


def flatten_summary(summary: Mapping[str, object]) -> dict[str, float]:
    """{"<run>/deepest_magnitude_raw": .., "<run>/psnr/<set>": ..} for metric loggers."""
    flat: dict[str, float] = {}
    for run, values in (summary.get("runs") or {}).items():
        for key, value in values.items():
            if isinstance(value, Mapping):
                for sub, number in value.items():
                    flat[f"{run}/{key}/{sub}"] = float(number)
            else:
                flat[f"{run}/{key}"] = float(value)
    return flat


def ablation_runs(results: Mapping[str, RunResults]) -> list[RunResults]:
    """One representative run each of LN, LN*, LN+Rs and i-LN (those that exist)."""
    picked = [
        tables.pick_run(results, n, groups=("table3", "table1"), need=lambda r: bool(r.probes))
        for n in tables.TABLE3_NORMS
    ]
    return sorted((r for r in picked if r is not None), key=lambda r: norm_rank(r.info.norm))


def headline(main: Sequence[RunResults], paper: Mapping | None = None) -> list[str]:
    """Each norm's growth from its own step 0, one clause per run (empty without two probes
    of any run): the deepest group's feature magnitude and channel entropy at its first and
    last training probe (raw weights); then the paper's Fig. 1 end points, labelled."""
    clauses = []
    for run in main:
        magnitude = dynamics.deepest_change(run, "magnitude")
        entropy = dynamics.deepest_change(run, "entropy")
        if magnitude is None:
            continue
        clause = f"{run.info.label} (`{run.info.name}`) {dynamics.growth_phrase(magnitude)}"
        if entropy is not None:
            clause += f", entropy {entropy.first:.2f} → {entropy.last:.2f} nats"
        clauses.append(clause)
    if not clauses:
        return []
    ceilings = {c for r in main if (c := _finite(r.deepest()["entropy_ceiling"])) is not None}
    ceiling = f"; entropy ceiling ln C = {max(ceilings):.2f}" if ceilings else ""
    feats = (paper or {}).get("features") or {}
    quote = (
        f" The paper (Fig. 1, HAT_1, 300K iterations): LN reaches "
        f"{feats['ln_magnitude_low']:g} to {feats['ln_magnitude_high']:g}, i-LN stays near "
        f"{feats['iln_magnitude_approx']:g}."
        if {"ln_magnitude_low", "ln_magnitude_high", "iln_magnitude_approx"} <= set(feats)
        else ""
    )
    return [
        "**Headline: each norm's change from its own step 0** (deepest group's feature "
        f"magnitude, mean x², raw weights, first to last training probe{ceiling}): "
        + "; ".join(clauses)
        + "."
        + quote,
        "",
    ]


def _scale_lines(results: Mapping[str, RunResults], scale_note: str) -> list[str]:
    done = [r for r in results.values() if r.has_results]

    def values(get: Callable[[RunResults], object]) -> str:
        return tables.joined([get(r) for r in done])

    speeds = [s for r in done if (s := r.mean_seconds_per_step()) is not None]
    return [
        f"> **Scale of these results: {scale_note}**",
        ">",
        f"> Runs with results: {len(done)} of {len(results)} declared; "
        f"arch {values(lambda r: r.info.arch)}; task {values(lambda r: r.info.task)}; "
        f"iterations {values(lambda r: r.info.iterations)}; "
        f"batch {values(lambda r: r.info.batch_size)}"
        + (
            f"; mean {sum(speeds) / len(speeds):.3g} s per training step (wall clock under "
            "whatever load the machine had; Table S4's note)."
            if speeds
            else "."
        ),
        ">",
        "> The paper's numbers come from full-scale GPU training (HAT_1: 300K iterations on DF2K, "
        "x4 SR, batch 16). Numbers from a smaller preset, fewer iterations or other data are not "
        "comparable in absolute value: compare directions and trends (the paper: LN's magnitude "
        "growing and entropy falling in deep groups, i-LN flat near the ceiling), not digits.",
    ]


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _group_reason(results: Mapping[str, RunResults], group: str, need: str) -> str:
    declared = [r.info.name for r in results.values() if group in r.info.groups]
    if not declared:
        return f"no run in group `{group}`"
    return f"no run in group `{group}` ({', '.join(declared)}) has {need} yet"


def _analysis_links(runs: Sequence[RunResults], out_dir: Path) -> list[str]:
    """The runs' final-norm (Fig. 8) and relative position bias (Fig. 9) figures, linked."""
    rows = [
        [f"{run.info.name} ({run.info.label})"]
        + [
            f"[{n}]({_rel(run.figures[n], out_dir)})" if n in run.figures else "–"
            for n in ANALYSIS_FIGURES
        ]
        for run in runs
        if run.figures
    ]
    header = ["run", "final norm", "rpb, first group", "rpb, last group"]
    return [*pipe_table(header, rows), ""] if rows else []


def _crop_sections(
    results: Mapping[str, RunResults],
    runs_dir: Path,
    figures_dir: Path,
    out_dir: Path,
    sets: Sequence[str] | None,
    pair_dirs: Callable[[str, str], tuple[Path, Path]],
) -> tuple[list[str], dict[str, str]]:
    lines = ["## Crops: where LN and i-LN differ most", ""]
    status: dict[str, str] = {}
    tasks = sorted({r.info.task for r in results.values() if r.info.scale is not None})
    for task in tasks:
        norms = dict.fromkeys([*tables.TABLE3_NORMS, *(r.info.norm for r in results.values())])
        picks = [
            tables.pick_run(results, n, task=task, need=lambda r: bool(r.metrics)) for n in norms
        ]
        picks = sorted((p for p in picks if p is not None), key=lambda r: norm_rank(r.info.norm))
        if not {"ln", "iln"} <= {p.info.norm for p in picks}:
            status[task] = "skipped: needs an LN and an i-LN run with evaluation results"
            lines += [f"- {task}: skipped (needs an LN and an i-LN run evaluated on {task}).", ""]
            continue
        labels = {p.info.norm: f"{norm_label(p.info.norm)} ({p.info.name})" for p in picks}
        colors = {labels[p.info.norm]: norm_style(p.info.norm).color for p in picks}
        for dataset in sets or sorted({s for p in picks for s in p.sets()}):
            samples = {"Bicubic": RunFiles(runs_dir / tables.BASELINE_RUN).samples(task, dataset)}
            samples |= {
                labels[p.info.norm]: RunFiles(p.folder).samples(task, dataset) for p in picks
            }
            lq_dir, gt_dir = pair_dirs(task, dataset)
            written = comparison_panels(
                lq_dir=lq_dir,
                gt_dir=gt_dir,
                scale=picks[0].info.scale,
                samples=samples,
                out_dir=figures_dir,
                prefix=f"crops_{task}_{dataset}",
                contrast=(labels["ln"], labels["iln"]),
                colors=colors,
            )
            key = f"{task}/{dataset}"
            if not written:
                missing = [label for label, d in samples.items() if not d.is_dir()]
                status[key] = f"skipped: no restored samples from {', '.join(missing)}"
                lines += [f"- {key}: skipped (no restored samples from {', '.join(missing)}).", ""]
                continue
            status[key] = "written"
            lines += [
                f"### {tables.task_name(task)}, {dataset}",
                "",
                "LR input, bicubic upsampling, every norm's restoration (whole-image PSNR in "
                "each title) and the ground truth, over the region where LN and i-LN differ most.",
                "",
            ]
            lines += [f"![{p.stem}]({_rel(p, out_dir)})" for p in written] + [""]
    return lines, status


def _tables_section(
    results: Mapping[str, RunResults],
    paper: Mapping,
    protocol: MeasuredOn,
    baseline: tables.Baseline | None,
    tables_dir: Path,
) -> tuple[list[str], dict[str, str]]:
    md = [
        "## Tables",
        "",
        "Tables 1-8 carry the paper's numbers and titles (the paper's numbering; the paper's "
        "Tables 5 and 7 are not reproduced); tables S1-S4 are ours. A row that no run of ours "
        "fills says `no run` in its 'our run(s)' cell and leaves our cells blank; `–` marks a "
        "number a run exists for but lacks. A table "
        "that no run of ours fills is one line saying which runs would fill it. Each row holds "
        "the paper's number and ours in adjacent columns ('(paper)', '(ours)'); the paper's "
        "numbers on sets we did not run share one cell per metric, in the order of its header. "
        "A PSNR of ours that the baseline (bicubic, or the degraded input) beats on the same "
        "images is marked 'below ...' in its cell.",
        "",
    ]
    status: dict[str, str] = {}
    for table, group in tables.report_tables(results, paper, protocol, baseline):
        fill = f"; filled by {table.filled_by}" if table.filled_by else ""
        if group is not None and not table.has_ours():
            reason = _group_reason(results, group, "results")
            status[table.key] = f"skipped: {reason}"
            md += [f"### {table.title}", "", f"Skipped: {reason}{fill}.", ""]
            continue
        section = write_table(table, tables_dir)
        if table.has_ours():
            md += section
            status[table.key] = "written"
            continue
        status[table.key] = "paper only (no run)"
        md += [
            f"### {table.title}",
            "",
            f"No run of ours yet{fill}; the paper's numbers: "
            f"[tables/{table.key}.md](tables/{table.key}.md).",
            "",
        ]
    return md, status


def _figures_section(
    results: Mapping[str, RunResults],
    main: Sequence[RunResults],
    paper: Mapping,
    protocol: MeasuredOn,
    figures_dir: Path,
) -> tuple[list[str], dict[str, str]]:
    feats = paper.get("features", {})
    fig1 = (
        f" Paper (Fig. 1, HAT_1, x4, 300K iterations): LN reaches "
        f"{feats['ln_magnitude_low']:g} to {feats['ln_magnitude_high']:g}, i-LN stays near "
        f"{feats['iln_magnitude_approx']:g}; entropy ceiling ln 96 = "
        f"{feats['entropy_ceiling_c96']:g}."
        if {"ln_magnitude_low", "ln_magnitude_high", "iln_magnitude_approx", "entropy_ceiling_c96"}
        <= set(feats)
        else ""
    )
    probes = (
        f" Measured on the raw (trained) weights every probe step, on {protocol.probe_images} "
        f"central {protocol.probe_crop}x{protocol.probe_crop} LR crops of {protocol.probe_set}."
    )
    colours = ", ".join(f"{norm_label(n)} {norm_style(n).color}" for n in tables.TABLE3_NORMS)
    md = ["## Figures", "", f"Colours are fixed per normalisation in every figure: {colours}.", ""]
    status: dict[str, str] = {}
    for fig in figures.FIGURES:
        runs_of = main if fig.group is None else tables.runs_in_group(results, fig.group)
        if fig.draw(runs_of, figures_dir / f"{fig.name}.png") is None:
            reason = (
                f"no LN, LN*, LN+Rs or i-LN run has {fig.need} yet"
                if fig.group is None
                else _group_reason(results, fig.group, fig.need)
            )
            status[fig.name] = f"skipped: {reason}"
            fill = f"; filled by the runs of {fig.filled_by}" if fig.filled_by else ""
            md += [f"- {fig.heading}: skipped ({reason}{fill}).", ""]
            continue
        status[fig.name] = "written"
        measured = ""
        if fig.dynamics is not None:
            drawn = [r for r in runs_of if r.probes]
            measured = " " + dynamics.dynamics_sentence(
                drawn, figures.run_labels(drawn), fig.dynamics
            )
        caption = (
            fig.caption
            + measured.rstrip()
            + (fig1 if fig.fig1 else "")
            + (probes if fig.probes else "")
        )
        md += [
            f"### {fig.heading}",
            "",
            caption,
            "",
            f"![{fig.name}](figures/{fig.name}.png)",
            "",
            f"Vector copy: [figures/{fig.name}.svg](figures/{fig.name}.svg).",
            "",
        ]
    return md, status


def _released_section(
    released: Mapping[str, RunResults], paper: Mapping, tables_dir: Path, out_dir: Path
) -> tuple[list[str], dict[str, str]]:
    md = ["## Released checkpoints (the authors' weights, evaluated without training)", ""]
    if not released:
        md += [
            "None declared (`released:` in params.yaml; README: \"The authors' released "
            'checkpoints").',
            "",
        ]
    status: dict[str, str] = {}
    for table in tables.released_tables(released, paper):
        md += write_table(table, tables_dir)
        status[table.key] = "written"
    links = _analysis_links(list(released.values()), out_dir)
    if links:
        md += [
            "Final-norm bias against its input (Fig. 8) and relative position bias (Fig. 9):",
            "",
            *links,
        ]
    return md, status


def _sources_section(paper: Mapping) -> list[str]:
    md = ["## Where the paper's numbers come from", "", f"Paper: {paper['paper']}.", ""]
    md += [
        f"- Table {key[5:]} ({block['title']}): {block['source']}"
        for key, block in paper["tables"].items()
    ]
    if "features" in paper:
        md.append(f"- Figures: {paper['features']['source']}")
    return [*md, ""]


def _mlflow_section(command: str, link: str) -> list[str]:
    return [
        "## In MLflow",
        "",
        f"`{command}` starts the MLflow UI on this project's store and prints the address of "
        f"[LN against i-LN on one chart page]({link}) (on the port it serves; `iln ui` alone "
        "picks a free one): the parent run of every grid member, one line each in its norm's "
        "colour, with the training loss, the validation PSNR, the deepest group's feature "
        "magnitude on a log axis and its channel entropy, then the final PSNR/SSIM. The "
        "runs table of that view opens with the PSNR, magnitude and entropy columns.",
        "",
        f"<{link}>",
        "",
    ]


def build_report(
    runs: Mapping[str, RunInfo],
    runs_dir: Path | str,
    out_dir: Path | str,
    *,
    scale_note: str,
    protocol: MeasuredOn | None = None,
    paper: Mapping | None = None,
    sets: Sequence[str] | None = None,
    released: Mapping[str, RunInfo] | None = None,
    pair_dirs: Callable[[str, str], tuple[Path, Path]] | None = None,
    mlflow: tuple[str, str] | None = None,
) -> dict[str, object]:
    """Write out_dir/report.md, out_dir/tables/<table>.{md,csv} and out_dir/figures/*.png.

    runs: run name -> its RunInfo (``RunInfo.from_subject``: what params.yaml declares).
    runs_dir: folder with one folder per run (layout: iln.config.layout.RunFiles); a run folder
      may hold only some of train/, eval/, analysis/.
    scale_note: what scale this ran at (preset, iterations, data, device), shown first.
    protocol: what our numbers were measured on (probe crops, Table 4 crop, EMA decay).
    paper: the paper numbers (default: the packaged paper_numbers.yaml).
    sets: our test sets to show, in order (default: every set in metrics.json).
    released: the `released:` entries' RunInfo (the authors' checkpoints), in their own section.
    pair_dirs: (task, set) -> (lq_dir, gt_dir) of the degraded test pairs, for the crop
      panels (None: no crop panels).
    mlflow: (the command that starts the MLflow UI, the link to the train runs' chart
      view in it), for the report's last section (None: no such section).
    Also writes out_dir/report.html, the same page with its figures embedded.
    Returns {"runs": {name: final numbers}, "metrics": {name: metrics_rows row},
    "tables": {key: status}, "figures": {name: status}}.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    paper = load_paper_numbers() if paper is None else paper
    protocol = protocol or MeasuredOn()
    results = load_runs(runs, runs_dir, sets=sets)
    baseline, _ = read_metrics(RunFiles(runs_dir / tables.BASELINE_RUN).metrics)

    main = ablation_runs(results)
    md = ["# i-LN reproduction report", "", *_scale_lines(results, scale_note), ""]
    md += headline(main, paper)
    lines, status = _tables_section(results, paper, protocol, baseline, tables_dir)
    md += lines
    lines, fig_status = _figures_section(results, main, paper, protocol, figures_dir)
    md += lines
    if pair_dirs is not None:
        lines, crop_status = _crop_sections(
            results, runs_dir, figures_dir, out_dir, sets, pair_dirs
        )
        md += lines
        fig_status |= {f"crops {k}": v for k, v in crop_status.items()}
    md += [
        "## Final-checkpoint analyses (paper Fig. 8: final-norm bias, Fig. 9: relative "
        "position bias)",
        "",
    ]
    md += _analysis_links(list(results.values()), out_dir) or [
        "Skipped: no run has analysis figures yet.",
        "",
    ]
    lines, released_status = _released_section(
        load_runs(released or {}, runs_dir, sets=sets), paper, tables_dir, out_dir
    )
    md += lines + _sources_section(paper)
    md += _mlflow_section(*mlflow) if mlflow is not None else []
    text = "\n".join(md)
    write_text_atomic(out_dir / "report.md", text)
    write_text_atomic(out_dir / "report.html", markdown_to_html(text, out_dir))
    return {
        "runs": {name: run_summary(run) for name, run in results.items() if run.has_results},
        "metrics": metrics_rows(results, baseline),
        "tables": status | released_status,
        "figures": fig_status,
    }
