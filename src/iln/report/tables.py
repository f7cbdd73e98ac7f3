"""Every table of the report, built from the results read once from the run folders: the
paper's tables, numbered and titled as in the paper, with the paper's numbers beside ours;
our own tables, numbered S1, S2, ...; the released checkpoints' tables.

Every table carries one sentence on what it shows and what our numbers were measured on
(image set, crop, weights, scale); the paper's numbers are always shown, our cells say
"no run" where there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from iln.config.layout import ENSEMBLE_SUFFIX, PRECISION_MODES, WEIGHTS_EMA, WEIGHTS_RAW
from iln.figures.styles import norm_label, norm_rank
from iln.report import dynamics
from iln.report.paper import paper_number, paper_rows
from iln.report.render import Column, Table
from iln.report.runs import RunResults

BASELINE_RUN = "bicubic"  # the baseline's folder under runs/ (bicubic SR, degraded input)

# The paper's Table 1 rows, in its order.
TABLE1_NORMS: tuple[str, ...] = (
    "ln",
    "rmsnorm",
    "layerscale",
    "none",
    "rezero",
    "batchnorm",
    "batchnorm_train",
    "instancenorm",
    "iln",
)
TABLE3_NORMS: tuple[str, ...] = ("ln", "ln_star", "ln_rs", "iln")
TABLE1_CAPTION = (
    "Each normalisation layer in the same Transformer: restoration quality and the deepest "
    "group's feature magnitude and channel entropy, which per-token LN drives up and down "
    "respectively."
)
TABLE3_CAPTION = (
    "Which half of i-LN does what: LN* normalises each image as a whole, LN+Rs rescales each "
    "residual branch by the input's std, i-LN does both."
)
# Which runs fill each table while none does (the report's one line): the config overlays
# that declare them (tests/test_report.py checks each overlay declares such runs).
FILLED_BY: dict[str, str] = {
    "table1": "runs of group `table1` (configs/cpu_ablation.yaml on a CPU, "
    "configs/paper_norms_x4.yaml at the paper's scale)",
    "table2": "LN and i-LN runs of one task and model family (configs/cpu_tasks.yaml on a "
    "CPU, configs/paper_tasks.yaml at the paper's scale)",
    "table3": "runs of group `table3` (the default params.yaml, configs/paper_norms_x4.yaml)",
    "table4": "runs of group `table4` (the default params.yaml, configs/paper_hat1_x4.yaml)",
    "table6": "LN and i-LN runs of the full-size preset `hat` (configs/paper_hat_dagger.yaml)",
    "table8": "runs of group `table8` (configs/cpu_ablation.yaml, configs/paper_hat1_x4.yaml)",
    "table_s1_stdnorm": "runs of group `stdnorm` (configs/cpu_ablation.yaml, "
    "configs/paper_hat1_x4.yaml)",
    "table_s2_seeds": "runs of group `seeds` (no shipped overlay: declare one setting with "
    "several `seed:` values)",
    "table_s3_batch": "runs of group `batch` (no shipped overlay: declare one setting with "
    "several `batch_size:` values)",
}
TABLE8_VARIANTS: dict[str, str] = {
    "ln": "LN",
    "ln_gradclip": "LN + gradient clipping",
    "ln_kld": "LN + KL-divergence regulariser",
    "iln": "i-LN",
}


def task_name(task: str) -> str:
    """sr_x4 -> "SR x4", realsr_x4 -> "real-world SR x4", dn_s15 -> "colour denoising σ=15",
    car_q10 -> "JPEG CAR q=10"."""
    if task == "derain":
        return "deraining"
    for prefix, name in (
        ("sr_x", "SR x"),
        ("realsr_x", "real-world SR x"),
        ("dn_s", "colour denoising σ="),
        ("car_q", "JPEG CAR q="),
    ):
        if task.startswith(prefix) and task[len(prefix) :].isdigit():
            return name + task[len(prefix) :]
    return task


# --------------------------------------------------------------------------------------
# How our numbers were measured


@dataclass(frozen=True)
class MeasuredOn:
    """What the report says our numbers were measured on (from params.yaml)."""

    probe_set: str = "the first test set"  # the probe batch: crops of its first images
    probe_images: int = 2
    probe_crop: int = 64  # LR side of the probe crops
    precision_crop: int = 0  # LR side of Table 4's central crops, 0 = whole images
    ema_decay: float | None = None


def joined(values: Sequence[object]) -> str:
    """The distinct values, sorted, comma-separated ("–" for none)."""
    found = sorted({str(v) for v in values if v is not None})
    return ", ".join(found) if found else "–"


def measured_eval(
    runs: Sequence[RunResults],
    protocol: MeasuredOn,
    *,
    crop: int = 0,
    sets: Sequence[str] | None = None,
) -> str:
    """One sentence: images, crop, weights and scale of our PSNR/SSIM (sets: default, every
    set the runs were evaluated on)."""
    if not runs:
        return "PSNR/SSIM: no run of ours in this table yet."
    sets = joined(sets if sets is not None else [s for r in runs for s in r.sets()])
    scales = sorted({s for r in runs if (s := r.info.scale) is not None})
    images = (
        f"central {crop}x{crop}-pixel LR crops of {sets}"
        + (f" (HR {', '.join(str(crop * s) for s in scales)} pixels)" if scales else "")
        if crop
        else f"{sets}, whole images"
    )
    decay = f", decay {protocol.ema_decay:g}" if protocol.ema_decay is not None else ""
    return (
        f"PSNR/SSIM on {images}, Y channel with the scale cropped at every border; EMA "
        f"weights{decay}; task {joined([task_name(r.info.task) for r in runs])}, "
        f"arch {joined([r.info.arch for r in runs])}, "
        f"{joined([r.info.iterations for r in runs])} iterations."
    )


def measured_features(runs: Sequence[RunResults], protocol: MeasuredOn) -> str:
    """One sentence: where the feature statistics come from, raw and EMA weights."""
    raw = joined([s.source for r in runs if (s := r.stats(WEIGHTS_RAW)) is not None])
    ema = joined([s.source for r in runs if (s := r.stats(WEIGHTS_EMA)) is not None])
    decay = f" (decay {protocol.ema_decay:g})" if protocol.ema_decay is not None else ""
    return (
        f"Feature statistics: output of the deepest group on {protocol.probe_images} central "
        f"{protocol.probe_crop}x{protocol.probe_crop}-pixel LR crops of {protocol.probe_set}; "
        f"'raw' = the weights being trained ({raw}), 'EMA' = their moving average{decay}, "
        f"the weights PSNR is measured with ({ema}). {ema_share(runs, protocol.ema_decay)}"
    )


def ema_share(runs: Sequence[RunResults], decay: float | None) -> str:
    """How much of the initial weights the EMA still holds after each run's last step:
    decay^T (e.g. 0.99^600 = 0.24%, 0.999^600 = 55%)."""
    steps = sorted({t for r in runs if (t := r.last_step() or r.info.iterations)})
    if decay is None or not steps:
        return "The EMA lags behind the raw weights early in training."
    shares = "; ".join(f"{decay:g}^{t} = {_percent(decay**t)}" for t in steps)
    return (
        f"After T steps the EMA still holds decay^T of the initial weights ({shares}), so "
        "where that share is large its statistics lag behind the raw ones."
    )


def _percent(share: float) -> str:
    return f"{share * 100:.2g}%" if share >= 1e-4 else f"{share:.1e}"


# --------------------------------------------------------------------------------------
# Selecting runs


def runs_in_group(results: Mapping[str, RunResults], group: str) -> list[RunResults]:
    """Runs declared in `group` that have any results, ordered by norm then name."""
    found = [r for r in results.values() if group in r.info.groups and r.has_results]
    return sorted(
        found,
        key=lambda r: (norm_rank(r.info.norm), r.info.grad_clip, r.info.kld_weight, r.info.name),
    )


def pick_run(
    results: Mapping[str, RunResults],
    variant: str,
    *,
    groups: Sequence[str] = (),
    task: str | None = None,
    need: Callable[[RunResults], bool] = lambda r: r.has_results,
) -> RunResults | None:
    """The most representative run of a variant (norm plus stabiliser, e.g. ln, ln_gradclip):
    in a preferred group, an SR task, the official stdnorm pairing, lowest seed, then name."""
    candidates = [
        r
        for r in results.values()
        if r.info.variant == variant and need(r) and (task is None or r.info.task == task)
    ]
    if not candidates:
        return None

    def rank(r: RunResults) -> tuple:
        in_group = min((i for i, g in enumerate(groups) if g in r.info.groups), default=len(groups))
        return (
            in_group,
            r.info.scale is None,
            r.info.stdnorm_switched,
            r.info.seed if r.info.seed is not None else 0,
            r.info.name,
        )

    return min(candidates, key=rank)


# --------------------------------------------------------------------------------------
# Columns shared by several tables

FEATURE_COLUMNS: tuple[Column, ...] = (  # keyed like RunResults.deepest()
    Column("deepest_magnitude_raw", "deepest magnitude, raw", "sci"),
    Column("deepest_entropy_raw", "deepest entropy, raw", "entropy"),
    Column("deepest_magnitude_ema", "deepest magnitude, EMA", "sci"),
    Column("deepest_entropy_ema", "deepest entropy, EMA", "entropy"),
    Column("entropy_ceiling", "entropy ceiling ln C", "entropy"),
)


def _fill_features(table: Table, row: str, run: RunResults) -> None:
    deepest = run.deepest()
    for col in FEATURE_COLUMNS:
        table.set_ours(row, col, deepest[col.key], run.info.name)


def _metric_column(set_name: str | None, metric: str, always_ours: bool = False) -> Column:
    """ "Set14 PSNR" (key Set14:psnr), or "PSNR" where the row names the set; the x8
    self-ensemble's metric (psnr_x8) reads "Set14 PSNR x8"."""
    base = metric.removesuffix(ENSEMBLE_SUFFIX)
    label = base.upper() + (" x8" if base != metric else "")
    if set_name is None:
        return Column(metric, label, base, always_ours)
    return Column(f"{set_name}:{metric}", f"{set_name} {label}", base, always_ours)


def _fill_metrics(
    table: Table,
    row: str,
    run: RunResults,
    set_name: str,
    metrics: Sequence[str],
    *,
    set_columns: bool = True,
) -> None:
    """Our numbers on one set, in columns named by the set (or, ``set_columns`` False, in
    "PSNR" / "SSIM" columns shown even where no run fills them: the row names the set); a
    run evaluated with ``evaluate.self_ensemble`` also fills the x8 self-ensemble's number
    beside each metric."""
    named = set_name if set_columns else None
    for m in metrics:
        column = _metric_column(named, m, always_ours=not set_columns)
        table.set_ours(row, column, run.metric(set_name, m), run.info.name)
        x8 = run.metric(set_name, m + ENSEMBLE_SUFFIX)
        if x8 is not None:
            table.set_ours(row, _metric_column(named, m + ENSEMBLE_SUFFIX), x8, run.info.name)


def _fill_runs(
    table: Table,
    rows: Mapping[str, RunResults],
    protocol: MeasuredOn,
    metrics: Sequence[str] = ("psnr", "ssim"),
) -> None:
    """Each row's run: its per-set numbers, then (in columns after every set's) its final
    feature statistics; and what they were measured on."""
    for row, run in rows.items():
        for s in run.sets():
            _fill_metrics(table, row, run, s, metrics)
    for row, run in rows.items():
        _fill_features(table, row, run)
    runs = list(rows.values())
    table.measured = [measured_eval(runs, protocol), measured_features(runs, protocol)]


def _paper_sets(table: Table, rows: Sequence[Mapping], row_of: Callable[[Mapping], str]) -> None:
    """Put the paper's per-set numbers (psnr/ssim) into their rows."""
    for prow in rows:
        row = row_of(prow)
        if "set" in prow:
            for m in ("psnr", "ssim"):
                if m in prow:
                    table.set_paper(row, _metric_column(prow["set"], m), prow[m])


def _paper_findings(table: Table, rows: Sequence[Mapping], row_of: Callable[[Mapping], str]):
    for prow in rows:
        if "finding" in prow:
            table.set_paper(row_of(prow), Column("finding", "finding", "text"), prow["finding"])


def paper_table(paper: Mapping, key: str, caption: str, row_header: str) -> Table:
    """A table of the paper's (key "table<N>"), with its title and source."""
    block = paper["tables"].get(key)
    if block is None:
        raise ValueError(f"paper numbers: no tables.{key} (title and source are needed)")
    where = "; ".join(f"{k} {v}" for k, v in (block.get("setting") or {}).items())
    source = block["source"][:1].upper() + block["source"][1:] + (f" ({where})." if where else ".")
    title = f"Table {key[5:]}: {block['title']}"
    return Table(key, title, caption, row_header, paper_source=source)


# --------------------------------------------------------------------------------------
# The paper's tables


Baseline = Mapping[str, Mapping[str, float]]  # its metrics.json: "<task>/<set>" -> metrics


def baseline_label(task: str) -> str:
    """What the baseline is for a task: bicubic upsampling for SR, else the degraded input."""
    return "bicubic" if task.startswith("sr_x") else "degraded input"


def _baseline_rows(table: Table, runs: Sequence[RunResults], baseline: Baseline | None) -> None:
    """One row per task of ``runs``: the baseline's PSNR/SSIM on the sets those runs show."""
    tasks = sorted({r.info.task for r in runs})
    for task in tasks if baseline else ():
        sets = list(dict.fromkeys(s for r in runs if r.info.task == task for s in r.sets()))
        found = {
            (s, m): v
            for s in sets
            for m in ("psnr", "ssim")
            if (v := (baseline.get(f"{task}/{s}") or {}).get(m)) is not None
        }
        if not found:
            continue
        row = f"{baseline_label(task)} (baseline" + (
            f", {task_name(task)})" if len(tasks) > 1 else ")"
        )
        table.add_row(row, [BASELINE_RUN])
        for (s, m), value in found.items():
            table.set_ours(row, _metric_column(s, m), value, BASELINE_RUN)


def mark_below_baseline(
    table: Table, row: str, column: str, value: float | None, base: float | None, task: str
) -> None:
    """Mark our PSNR in (row, column) where the baseline on the same images scores higher:
    "below bicubic 33.57" (the model has not learnt the task as well as upsampling)."""
    if value is not None and base is not None and value < base:
        table.marks[(row, column)] = f"below {baseline_label(task)} {base:.2f}"


def _mark_rows(table: Table, rows: Mapping[str, RunResults], baseline: Baseline | None) -> None:
    """Every per-set PSNR of ours that the baseline beats on the same task and set, marked."""
    for row, run in rows.items():
        for s in run.sets():
            base = ((baseline or {}).get(f"{run.info.task}/{s}") or {}).get("psnr")
            key = _metric_column(s, "psnr").key
            mark_below_baseline(table, row, key, run.metric(s, "psnr"), base, run.info.task)


def _norm_rows_table(
    key: str,
    caption: str,
    norms: Sequence[str],
    results: Mapping[str, RunResults],
    paper: Mapping,
    protocol: MeasuredOn,
    baseline: Baseline | None,
) -> Table:
    """Tables 1 and 3: rows = norms; the paper's per-set numbers and findings, our per-set
    numbers and final feature statistics (raw and EMA). Our run of a norm: one in the group
    named like the table (`table1`, `table3`) if any, else the most representative run of
    that norm (named in the "our run(s)" column). The last row is the baseline (bicubic for
    SR, the degraded input otherwise) on the same sets."""
    table, group = paper_table(paper, key, caption, "normalisation"), key
    extra = [r.info.norm for r in runs_in_group(results, group) if r.info.norm not in norms]
    picked: dict[str, RunResults] = {}
    for norm in [*norms, *dict.fromkeys(extra)]:
        run = pick_run(results, norm, groups=(group,))
        table.add_row(norm_label(norm), [run.info.name] if run else [])
        picked |= {norm_label(norm): run} if run else {}
    rows = paper_rows(paper, key)
    _paper_sets(table, rows, lambda p: norm_label(p["norm"]))
    _fill_runs(table, picked, protocol)
    _paper_findings(table, rows, lambda p: norm_label(p["norm"]))
    _baseline_rows(table, list(picked.values()), baseline)
    _mark_rows(table, picked, baseline)
    borrowed = [r.info.name for r in picked.values() if group not in r.info.groups]
    if borrowed:
        table.notes.append(
            f"No run of group `{group}` for some norms: their rows show the most representative "
            f"run of that norm from the rest of the grid ({', '.join(borrowed)})."
        )
    return table


def _pair_columns(table: Table) -> dict[str, Column]:
    table.psnr_ssim_cells = True  # "31.07 / 0.8986": the pair fits one page
    cols = {
        "ln:psnr": Column("ln:psnr", "LN PSNR", "psnr", always_ours=True),
        "ln:ssim": Column("ln:ssim", "LN SSIM", "ssim", always_ours=True),
        "iln:psnr": Column("iln:psnr", "i-LN PSNR", "psnr", always_ours=True),
        "iln:ssim": Column("iln:ssim", "i-LN SSIM", "ssim", always_ours=True),
        "gain": Column("gain", "i-LN − LN PSNR (dB)", "psnr", always_ours=True),
    }
    for col in cols.values():
        table.add_column(col)
    return cols


def _pair_runs(
    results: Mapping[str, RunResults],
    task: str,
    set_name: str,
    arch: str | None,
    same_model: Callable[[str], bool],
) -> dict[str, RunResults | None]:
    """Our LN and i-LN run evaluated on task / set whose arch ``same_model`` accepts: one of
    ``arch`` itself first, then by name."""

    def pick(norm: str) -> RunResults | None:
        found = [
            r
            for r in results.values()
            if r.info.variant == norm
            and r.info.task == task
            and r.metric(set_name, "psnr") is not None
            and same_model(r.info.arch)
        ]
        return min(found, key=lambda r: (r.info.arch != arch, r.info.name), default=None)

    return {norm: pick(norm) for norm in ("ln", "iln")}


def _pair_row(
    table: Table,
    cols: Mapping[str, Column],
    row: str,
    set_name: str,
    runs: Mapping[str, RunResults | None],
    prows: Sequence[Mapping] = (),
) -> list[RunResults]:
    """Our LN and i-LN numbers on one set and the paper's, each with i-LN's gain, into one
    row; returns our runs."""
    ours = [r for r in runs.values() if r is not None]
    table.add_row(row, [r.info.name for r in ours])
    for run in ours:
        for m in ("psnr", "ssim"):
            col = cols[f"{run.info.variant}:{m}"]
            table.set_ours(row, col, run.metric(set_name, m), run.info.name)
    for prow in prows:
        for m in ("psnr", "ssim"):
            if m in prow:
                table.set_paper(row, cols[f"{prow['norm']}:{m}"], prow[m])
    a, b = table.cell(row, "ln:psnr").ours, table.cell(row, "iln:psnr").ours
    if a is not None and b is not None:
        table.cell(row, "gain").ours = b - a
    by_norm = {p["norm"]: p for p in prows if "psnr" in p}
    if {"ln", "iln"} <= set(by_norm):
        table.cell(row, "gain").paper = round(by_norm["iln"]["psnr"] - by_norm["ln"]["psnr"], 6)
    return ours


def _unique(runs: Sequence[RunResults]) -> list[RunResults]:
    """Runs without repeats, in first-seen order."""
    return list({r.info.name: r for r in runs}.values())


def _family(arch: str) -> str:
    """The backbone a preset belongs to (HAT, SwinIR or DRCT): LN and i-LN runs are paired
    within one family, never across."""
    return next((f for f in ("swinir", "drct") if arch.startswith(f)), "hat")


def _groups_of(rows: Sequence[Mapping], keys: Sequence[str]) -> list[tuple]:
    """Distinct identity tuples of the paper's rows, in file order."""
    return list(dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows))


def table2(
    results: Mapping[str, RunResults],
    paper: Mapping,
    protocol: MeasuredOn,
    baseline: Baseline | None = None,
) -> Table:
    """LN vs i-LN on every task and model (the paper's Table 2), plus every task we ran;
    the baseline's PSNR (bicubic for SR, the degraded input otherwise) beside each pair."""
    table = paper_table(
        paper,
        "table2",
        "The same model trained with LN and with i-LN on each restoration task; "
        "the last column is what switching to i-LN gains.",
        "task / test set / model",
    )
    cols = _pair_columns(table)
    base_col = Column("baseline:psnr", "bicubic / input PSNR", "psnr", always_ours=True)

    def fill_baseline(row: str, task: str, set_name: str) -> None:
        value = ((baseline or {}).get(f"{task}/{set_name}") or {}).get("psnr")
        if value is not None and table.row_runs.get(row):
            table.set_ours(row, base_col, value, BASELINE_RUN)
            below = []
            for norm in ("ln", "iln"):
                ours = table.cell(row, f"{norm}:psnr").ours
                mark_below_baseline(table, row, f"{norm}:psnr", ours, value, task)
                below += [norm_label(norm)] if (row, f"{norm}:psnr") in table.marks else []
            if below and table.cell(row, "gain").ours is not None:
                who = " and ".join(below)
                table.marks[(row, "gain")] = f"{who} below {baseline_label(task)}"

    def pair(task: str, set_name: str, arch: str | None) -> dict[str, RunResults | None]:
        same = (lambda a: True) if arch is None else (lambda a: _family(a) == _family(arch))
        return _pair_runs(results, task, set_name, arch, same)

    used: list[RunResults] = []
    covered = set()
    prows = paper_rows(paper, "table2")
    for task, set_name, arch in _groups_of(prows, ("task", "set", "arch")):
        row = f"{task_name(task)} / {set_name} / {arch}"
        same = [p for p in prows if (p["task"], p["set"], p.get("arch")) == (task, set_name, arch)]
        found = _pair_row(table, cols, row, set_name, pair(task, set_name, arch), same)
        fill_baseline(row, task, set_name)
        used += found
        covered |= {(task, set_name, r.info.arch) for r in found}
    ours_only = sorted(
        (r for r in results.values() if r.info.variant in ("ln", "iln")),
        key=lambda r: (r.info.task, r.info.arch, r.info.name),
    )
    for run in ours_only:
        task, arch = run.info.task, run.info.arch
        for set_name in run.sets():
            if (task, set_name, arch) in covered:  # one row per model
                continue
            covered.add((task, set_name, arch))
            row = f"{task_name(task)} / {set_name} / {arch}"
            used += _pair_row(table, cols, row, set_name, pair(task, set_name, arch))
            fill_baseline(row, task, set_name)
    table.measured = [measured_eval(_unique(used), protocol)]
    table.notes.append(
        "A paper row's model names the paper's; ours is the run's preset of the same family "
        "(HAT, SwinIR or DRCT), named in 'our run(s)'. Rows below the paper's are tasks only "
        "we ran."
    )
    if table.has_ours(base_col.key):
        table.notes.append(
            "bicubic / input PSNR: the baseline on the same images (bicubic upsampling for "
            "SR, the degraded input itself otherwise): a model below it has not yet learnt "
            "the task, so its gain over the other norm says little about the norms; such "
            "a PSNR is marked 'below ...' in its cell."
        )
    return table


def table4(results: Mapping[str, RunResults], paper: Mapping, protocol: MeasuredOn) -> Table:
    """PSNR and overflow per inference precision, LN vs i-LN (the paper's Table 4)."""
    table = paper_table(
        paper,
        "table4",
        "The trained model run in lower precision: LN's large features overflow "
        "fp16 and lose int8/int4 resolution, i-LN's stay in range.",
        "normalisation / precision",
    )
    prows = paper_rows(paper, "table4")
    group = [r.info.norm for r in runs_in_group(results, "table4") if r.precision]
    norms = list(dict.fromkeys(["ln", "iln", *group]))
    picked = []
    for norm in norms:
        run = pick_run(results, norm, groups=("table4",), need=lambda r: bool(r.precision))
        paper_modes = [p["precision"] for p in prows if p["norm"] == norm]
        modes = _modes([*(run.precision if run else ()), *paper_modes])
        if run is not None:
            picked.append(run)
        for mode in modes or PRECISION_MODES[:1]:
            row = f"{norm_label(norm)} / {mode}"
            table.add_row(row, [run.info.name] if run else [])
            for p in prows:
                if p["norm"] == norm and p["precision"] == mode:
                    table.set_paper(row, _metric_column(p["set"], "psnr"), p["psnr"])
            if run is not None:
                _fill_precision(table, row, run, mode)
    for run in picked:
        if run.info.norm == "ln":
            remark = fp16_remark(run.precision)
            if remark is not None:
                table.set_ours(
                    f"{norm_label('ln')} / fp16",
                    Column("scale", "at this scale", "text"),
                    remark,
                    run.info.name,
                )
    sets = [s for r in picked for per_set in r.precision.values() for s in per_set]
    table.measured = [measured_eval(picked, protocol, crop=protocol.precision_crop, sets=sets)]
    if protocol.precision_crop:
        table.notes.append(
            f"Measured on {protocol.precision_crop}-pixel LR crops, so the fp32 row differs "
            "from the whole-image PSNR of the other tables."
        )
    table.notes.append(
        "fp16 / bf16: every weight, activation and residual addition in that format; int8 / "
        "int4: weights and activations fake-quantised. Overflow: a non-finite value anywhere "
        "in the forward pass."
    )
    return table


def _modes(modes: Sequence[str]) -> list[str]:
    """The precision modes present, in iln.config.layout.PRECISION_MODES order."""
    return [m for m in PRECISION_MODES if m in modes]


def _fill_precision(table: Table, row: str, run: RunResults, mode: str) -> None:
    """Our PSNR and overflow per set in one precision mode."""
    for set_name, entry in ((run.precision or {}).get(mode) or {}).items():
        table.set_ours(row, _metric_column(set_name, "psnr"), entry["psnr"], run.info.name)
        overflow = Column(f"{set_name}:overflow", f"{set_name} overflow", "bool")
        table.set_ours(row, overflow, entry["overflow"], run.info.name)


FP16_COLLAPSE_DB = 1.0  # an fp16 PSNR this far below fp32 counts as LN's collapse


def fp16_remark(precision: Mapping[str, Mapping[str, Mapping[str, object]]] | None) -> str | None:
    """Whether LN's fp16 failure (the paper: overflow, PSNR collapsing from ~27 to ~7 dB)
    shows in our run: "reproduced" or "not reproduced at this scale", with the numbers."""
    fp16, fp32 = (precision or {}).get("fp16") or {}, (precision or {}).get("fp32") or {}
    found = []
    for set_name, entry in fp16.items():
        low, full = entry.get("psnr"), (fp32.get(set_name) or {}).get("psnr")
        if entry.get("overflow") or (
            low is not None and full is not None and full - low > FP16_COLLAPSE_DB
        ):
            return "reproduced: fp16 overflows or collapses"
        if low is not None and full is not None:
            found.append(f"{set_name} {low:.2f} vs {full:.2f} dB")
    if not found:
        return None
    return (
        "not reproduced at this scale: no overflow, fp16 vs fp32 "
        + "; ".join(found)
        + " (LN's features stay far inside fp16's range here)"
    )


def table6(results: Mapping[str, RunResults], paper: Mapping, protocol: MeasuredOn) -> Table:
    """The full-size HAT (HAT†) with LN and i-LN (the paper's Table 6)."""
    table = paper_table(
        paper,
        "table6",
        "Whether i-LN's gain holds for the full-size HAT, not only the small HAT_1.",
        "task / test set",
    )
    cols = _pair_columns(table)
    arch = (paper["tables"]["table6"].get("setting") or {}).get("arch", "hat")

    used = []
    prows = paper_rows(paper, "table6")
    rows = _groups_of(prows, ("task", "set"))
    for run in results.values():
        if run.info.arch == arch and run.info.variant in ("ln", "iln"):
            rows += [(run.info.task, s) for s in run.sets() if (run.info.task, s) not in rows]
    for task, set_name in rows:
        runs = _pair_runs(results, task, set_name, arch, lambda a: a == arch)
        same = [p for p in prows if (p["task"], p["set"]) == (task, set_name)]
        used += _pair_row(table, cols, f"{task_name(task)} / {set_name}", set_name, runs, same)
    table.measured = [measured_eval(_unique(used), protocol)]
    table.notes.append(f"Ours: runs with the full preset `{arch}` only.")
    return table


def table8(
    results: Mapping[str, RunResults],
    paper: Mapping,
    protocol: MeasuredOn,
    baseline: Baseline | None = None,
) -> Table:
    """Other stabilisers against i-LN (the paper's Table 8); where the paper gives i-LN's
    magnitude (about 1.2), a note puts ours beside it with the factor between them."""
    table = paper_table(
        paper,
        "table8",
        "Whether clipping the gradients or regularising the feature statistics stops "
        "LN's feature divergence, and at what cost in PSNR, against i-LN.",
        "training",
    )
    group = [r.info.variant for r in runs_in_group(results, "table8")]
    picked = []
    max_abs = Column("max_abs", "max |x|, raw", "sci", always_ours=True)
    for variant in dict.fromkeys([*TABLE8_VARIANTS, *group]):
        run = pick_run(results, variant, groups=("table8",))
        row = TABLE8_VARIANTS.get(variant) or variant
        table.add_row(row, [run.info.name] if run else [])
        for p in paper_rows(paper, "table8", variant=variant):
            if "max_abs" in p:
                table.set_paper(row, max_abs, p["max_abs"])
        table.add_column(max_abs)
        if run is None:
            continue
        picked.append(run)
        deepest = run.deepest()
        for column, value in (
            (max_abs, run.final_max_abs(WEIGHTS_RAW)),
            (Column("max_abs_training", "max |x| during training", "sci"), run.training_max_abs()),
            *((col, deepest[col.key]) for col in FEATURE_COLUMNS[:2]),  # raw magnitude, entropy
        ):
            table.set_ours(row, column, value, run.info.name)
        for s in run.sets():
            _fill_metrics(table, row, run, s, ("psnr",))
        _mark_rows(table, {row: run}, baseline)
    findings = paper_rows(paper, "table8")
    _paper_findings(table, findings, lambda p: TABLE8_VARIANTS.get(p["variant"]) or p["variant"])
    table.measured = [measured_eval(picked, protocol), measured_features(picked, protocol)]
    table.notes.append(
        "max |x|: the largest absolute value of the residual stream over every probed layer; "
        "'during training' is the largest over every probe step."
    )
    iln = next((r for r in picked if r.info.variant == "iln"), None)
    note = iln_magnitude_note(iln, paper) if iln is not None else None
    table.notes += [note] if note else []
    return table


def iln_magnitude_note(run: RunResults, paper: Mapping) -> str | None:
    """The paper's i-LN magnitude (about 1.2, Fig. 1) beside ours, with the factor between
    them and ours' change from step 0 (None without either number)."""
    approx = (paper.get("features") or {}).get("iln_magnitude_approx")
    ours = run.deepest()["deepest_magnitude_raw"]
    if approx is None or ours is None:
        return None
    change = dynamics.deepest_change(run, "magnitude")
    since = f"; from its step-0 value it {dynamics.growth_phrase(change)}" if change else ""
    relation = (
        f"within {dynamics.STEADY:g}x of it"
        if 1 / dynamics.STEADY <= ours / approx <= dynamics.STEADY
        else f"x{ours / approx:.2g} of it"
    )
    return (
        f"The paper's i-LN 'magnitude about {approx:g}' (its Fig. 1: mean x², HAT_1 after 300K "
        f"iterations) against ours: i-LN's deepest group ends at {ours:.3g} "
        f"(`{run.info.name}`, raw weights), {relation}{since}."
    )


# --------------------------------------------------------------------------------------
# Our own tables (S1, S2, ...)


def _group_table(
    results: Mapping[str, RunResults],
    protocol: MeasuredOn,
    group: str,
    row_of: Callable[[RunResults], str],
    table: Table,
) -> tuple[Table, str]:
    """Ours: one row per run of a group, PSNR/SSIM and features; shown only with results."""
    rows: dict[str, RunResults] = {}
    for run in runs_in_group(results, group):
        row = row_of(run)
        row = f"{row} [{run.info.name}]" if row in rows else row
        table.add_row(row, [run.info.name])
        rows[row] = run
    _fill_runs(table, rows, protocol)
    return table, group


def _stdnorm_row(run: RunResults) -> str:
    return f"{norm_label(run.info.norm)} / stdnorm " + ("on" if run.info.stdnorm_on else "off")


def _run_row(run: RunResults) -> str:
    """The run's label with its seed and batch size: "LN + grad clip 1 (seed 1, batch 4)"."""
    info = run.info
    extra = [f"seed {info.seed}"] if info.seed is not None else []
    extra += [f"batch {info.batch_size}"] if info.batch_size is not None else []
    return f"{info.label} ({', '.join(extra)})" if extra else info.label


def all_runs_table(results: Mapping[str, RunResults], protocol: MeasuredOn) -> Table:
    """Ours: every declared run with its setting, final features and PSNR."""
    table = Table(
        key="table_s4_runs",
        title="Table S4: every run (ours)",
        caption="Every declared run: how far it trained, how fast, its PSNR and its final "
        "feature statistics for both the raw and the EMA weights.",
        row_header="run",
    )
    steps = (
        Column("iterations", "iterations", "int"),
        Column("last_step", "last probed/logged step", "int"),
        Column("sec_per_step", "s/step", "sci"),
    )
    rows: dict[str, RunResults] = {}
    for run in results.values():
        for col in steps:
            table.add_column(col)
        row = f"{run.info.name}: {run.info.arch} {run.info.label} {run.info.task}"
        table.add_row(row, [run.info.name] if run.has_results else [])
        if run.has_results:
            rows[row] = run
            values = (run.info.iterations, run.last_step(), run.mean_seconds_per_step())
            for col, value in zip(steps, values, strict=True):
                table.set_ours(row, col, value, run.info.name)
    _fill_runs(table, rows, protocol, metrics=("psnr",))
    table.notes.append(TIMING_NOTE)
    return table


TIMING_NOTE = (
    "s/step: the mean wall-clock time of a training step as logged, on whatever machine and "
    "load the run had (`dvc repro` may train several runs at once on shared cores); it is "
    "no speed comparison between norms. Speeds are measured under controlled load by the "
    "benchmarks (benchmarks/)."
)


def report_tables(
    results: Mapping[str, RunResults],
    paper: Mapping,
    protocol: MeasuredOn,
    baseline: Baseline | None,
) -> list[tuple[Table, str | None]]:
    """Every table of the report in its order, each with the group whose runs it needs to be
    shown at all (None: always shown, with the paper's numbers where no run fills it)."""
    common = (results, paper, protocol)
    stdnorm = Table(
        "table_s1_stdnorm",
        "Table S1: input standardisation (stdnorm) on and off (ours, not in the paper)",
        "The official i-LN models standardise the input and the official LN baselines do not; "
        "this separates that switch from the normalisation itself.",
        "normalisation / stdnorm",
    )
    seeds = Table(
        "table_s2_seeds",
        "Table S2: seeds (ours)",
        "The same setting trained from different seeds: how much of a difference between "
        "norms is noise.",
        "run",
    )
    batch = Table(
        "table_s3_batch",
        "Table S3: batch size (ours)",
        "The same setting trained at different batch sizes.",
        "run",
    )
    tables = [
        (_norm_rows_table("table1", TABLE1_CAPTION, TABLE1_NORMS, *common, baseline), None),
        (table2(results, paper, protocol, baseline), None),
        (_norm_rows_table("table3", TABLE3_CAPTION, TABLE3_NORMS, *common, baseline), None),
        (table4(*common), None),
        (table6(*common), None),
        (table8(*common, baseline), None),
        _group_table(results, protocol, "stdnorm", _stdnorm_row, stdnorm),
        _group_table(results, protocol, "seeds", _run_row, seeds),
        _group_table(results, protocol, "batch", _run_row, batch),
        (all_runs_table(results, protocol), None),
    ]
    for table, _ in tables:
        table.filled_by = FILLED_BY.get(table.key)
    return tables


# --------------------------------------------------------------------------------------
# The authors' released checkpoints (`released:` in params.yaml)


def released_model(run: RunResults) -> str:
    """ "hat_1 LN x4 no stdnorm": the arch, norm, scale and stdnorm of a released entry."""
    info = run.info
    parts = [info.arch, norm_label(info.norm), f"x{info.scale}" if info.scale else info.task]
    if info.stdnorm is not None:
        parts.append("stdnorm" if info.stdnorm else "no stdnorm")
    return " ".join(parts)


def _evaluation(record: Mapping) -> str:
    """How a released entry was evaluated: whole images or tiled."""
    tile = int(record.get("tile") or 0)
    if tile:
        return f"tiled ({tile} px LR tiles, {int(record.get('tile_overlap') or 0)} overlap)"
    return "whole image"


def released_tables(results: Mapping[str, RunResults], paper: Mapping) -> list[Table]:
    """The released entries' PSNR / SSIM beside the paper's number for the same arch, norm,
    scale and set (with the weights file, its SHA-256 and whether the number was tiled), the
    final model's feature statistics, and the inference-precision table."""
    scores = Table(
        key="released",
        title="Released checkpoints: PSNR / SSIM beside the paper",
        caption="The authors' weights evaluated without training, against the paper's "
        "number for the same arch, norm, scale and set where the paper has one.",
        row_header="model / set",
        measured=[
            "PSNR / SSIM on Y, border = scale, output rounded to uint8; whole image with "
            "reflect padding at the bottom/right to a multiple of the window (the authors' "
            "test protocol) unless the evaluation column says tiled."
        ],
    )
    features = Table(
        key="released_features",
        title="Released checkpoints: final-model features",
        caption="Feature statistics of each released model on the probe images (Fig. 1's "
        "end point; max |x| as in Table 8): where LN's large magnitudes show.",
        row_header="model",
    )
    precision = Table(
        key="released_precision",
        title="Released checkpoints: inference precision",
        caption="PSNR in dB of each released model run in lower precision (Table 4 style).",
        row_header="model / precision",
    )
    sources: set[str] = set()
    crops: set[int] = set()
    for name, run in results.items():
        model = released_model(run)
        sources |= _released_scores(scores, name, run, model, paper)
        _released_features(features, name, run, model)
        for mode in _modes(list(run.precision or {})):
            precision.add_row(f"{model} / {mode}", [name])
            _fill_precision(precision, f"{model} / {mode}", run, mode)
        if (run.weights_record or {}).get("precision_crop"):
            crops.add(int(run.weights_record["precision_crop"]))
    _released_weights(scores, results)
    scores.notes += ["SHA-256: its first 12 hex digits here, all of it in the CSV."]
    if scores.has_ours("psnr" + ENSEMBLE_SUFFIX) or scores.has_ours("ssim" + ENSEMBLE_SUFFIX):
        scores.notes.append(
            "x8: the self-ensemble (evaluate.self_ensemble: the 8 flips / transposes of each "
            "input, outputs transformed back and averaged before rounding; the paper reports "
            "none)."
        )
    scores.notes += [f"{k}: {paper['tables'][k]['source']}" for k in sorted(sources)]
    precision.notes += [
        f"Measured on central {crop} px LR crops of the test images (evaluate.precision_crop), "
        "not whole images."
        for crop in sorted(crops)
    ]
    return [t for t in (scores, features, precision) if t.rows]


def _released_scores(
    scores: Table, name: str, run: RunResults, model: str, paper: Mapping
) -> set[str]:
    """A released entry's rows of PSNR / SSIM per set, beside the paper's; the paper tables
    the numbers come from."""
    info, sources = run.info, set()
    for set_name in run.sets():
        row = f"{model} / {set_name}"
        scores.add_row(row, [name])
        _fill_metrics(scores, row, run, set_name, ("psnr", "ssim"), set_columns=False)
        for metric in ("psnr", "ssim"):
            found = paper_number(
                paper, arch=info.arch, norm=info.norm, task=info.task, set_name=set_name,
                metric=metric,
            )  # fmt: skip
            if found is not None:
                scores.set_paper(row, _metric_column(None, metric, True), found[0])
                sources.add(found[1])
    if not run.sets():
        scores.add_row(f"{model} / not evaluated yet", [name])
    return sources


def _released_features(features: Table, name: str, run: RunResults, model: str) -> None:
    """A released entry's final-model feature statistics (EMA weights), if analysed."""
    if run.stats(WEIGHTS_EMA) is None:
        return
    features.add_row(model, [name])
    for column, value in (
        (Column("layer", "deepest group", "text"), run.deepest_layer(WEIGHTS_EMA)),
        *(
            (Column(key, label, fmt), run.final_stat(key, WEIGHTS_EMA))
            for key, label, fmt in (
                ("magnitude", "mean x^2", "sci"),
                ("max_abs", "max |x|", "sci"),
                ("entropy", "entropy", "entropy"),
                ("entropy_ceiling", "entropy ceiling ln C", "entropy"),
            )
        ),
        (Column("max_abs_any", "max |x|, any layer", "sci"), run.final_max_abs(WEIGHTS_EMA)),
    ):
        features.set_ours(model, column, value, name)


def _released_weights(scores: Table, results: Mapping[str, RunResults]) -> None:
    """After the numbers of each row of one entry: how it was evaluated, the weights file and
    its SHA-256 (a row shared by two entries of one model and set has no one file)."""
    for row, names in scores.row_runs.items():
        if len(names) != 1:
            continue
        run, record = results[names[0]], results[names[0]].weights_record or {}
        for column, value in (
            (
                Column("evaluation", "evaluation", "text"),
                _evaluation(record) if run.sets() else None,
            ),
            (Column("file", "weights file", "text"), record.get("file") or str(run.info.weights)),
            (Column("sha256", "SHA-256", "digest"), record.get("sha256")),
        ):
            scores.set_ours(row, column, value, names[0])
