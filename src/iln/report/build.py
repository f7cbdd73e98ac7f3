"""The report: every table (markdown + CSV), the figures, and report.md that links them."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from iln.util.files import write_text_atomic
from iln.config.layout import ANALYSIS_FIGURES, WEIGHTS_RAW, RunFiles
from iln.report import figures, tables
from iln.report.crops import comparison_panels
from iln.report.html import markdown_to_html
from iln.report.paper import load_paper_numbers
from iln.report.runs import RunInfo, RunResults, load_runs, read_metrics
from iln.report.render import pipe_table, write_table
from iln.report.tables import Protocol
from iln.figures.styles import norm_label, norm_rank, norm_style


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def run_summary(run: RunResults) -> dict[str, object]:
    """Final numbers of one run (finite floats only, so the dict is valid JSON)."""
    final = {
        **run.deepest(),
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


def headline(main: Sequence[RunResults]) -> list[str]:
    """LN against i-LN at the last probe, in one sentence (empty without both)."""
    picked = {r.info.variant: r for r in main}
    ln, iln = picked.get("ln"), picked.get("iln")
    if ln is None or iln is None:
        return []
    (lm, le), (im, ie) = (
        [_finite(r.deepest()[f"deepest_{stat}_raw"]) for stat in ("magnitude", "entropy")]
        for r in (ln, iln)
    )
    if None in (lm, le, im, ie):
        return []
    return [
        f"**Headline:** at the last training probe (raw weights, deepest group), LN "
        f"(`{ln.info.name}`, step {ln.last_probe_step()}) has {lm / im:.3g}x the feature "
        f"magnitude of i-LN (`{iln.info.name}`, step {iln.last_probe_step()}): "
        f"{lm:.3g} vs {im:.3g}; its channel entropy is {le / ie:.2f}x i-LN's: "
        f"{le:.3f} vs {ie:.3f} nats.",
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
        "comparable in absolute value: compare directions and trends (LN's magnitude growing and "
        "entropy falling in deep groups, i-LN flat near the ceiling), not digits.",
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
    protocol: Protocol,
    baseline: tables.Baseline | None,
    tables_dir: Path,
) -> tuple[list[str], dict[str, str]]:
    md = [
        "## Tables",
        "",
        "Tables 1-8 carry the paper's numbers and titles (the paper's numbering; the paper's "
        "Tables 5 and 7 are not reproduced); tables S1-S4 are ours. Our cells say `no run` "
        "where no run of ours fills them; `–` where a run exists but lacks that number.",
        "",
    ]
    status: dict[str, str] = {}
    for table, group in tables.report_tables(results, paper, protocol, baseline):
        if group is not None and not table.has_ours():
            reason = _group_reason(results, group, "results")
            status[table.key] = f"skipped: {reason}"
            md += [f"### {table.title}", "", f"Skipped: {reason}.", ""]
            continue
        md += write_table(table, tables_dir)
        status[table.key] = "written" if table.has_ours() else "paper only (no run)"
    return md, status


def _figures_section(
    results: Mapping[str, RunResults],
    main: Sequence[RunResults],
    paper: Mapping,
    protocol: Protocol,
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
            md += [f"- {fig.heading}: skipped ({reason}).", ""]
            continue
        status[fig.name] = "written"
        caption = fig.caption + (fig1 if fig.fig1 else "") + (probes if fig.probes else "")
        md += [f"### {fig.heading}", "", caption, "", f"![{fig.name}](figures/{fig.name}.png)", ""]
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
        f"Start the UI in the project folder with `{command}` and open "
        f"[the train runs in the chart view]({link}): one chart per metric, every run in "
        "its norm's colour; `features/deepest/magnitude` and `features/deepest/entropy` "
        "compare LN's deepest group with i-LN's. The parent run of each grid member (named "
        "after it) holds its effective params, final PSNR/SSIM and the same curves.",
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
    protocol: Protocol | None = None,
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
    protocol = protocol or Protocol()
    results = load_runs(runs, runs_dir, sets=sets)
    baseline, _ = read_metrics(RunFiles(runs_dir / tables.BASELINE_RUN).metrics)

    main = ablation_runs(results)
    md = ["# i-LN reproduction report", "", *_scale_lines(results, scale_note), ""]
    md += headline(main)
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
