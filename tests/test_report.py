"""The report from a synthetic runs folder: the paper's tables under the paper's numbers and
titles, our numbers beside them (raw and EMA weights labelled), missing runs and groups."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import iln
from iln.config.params import RunSpec, load_params
from iln.data.io import write_png
from iln.figures.styles import NORM_STYLES
from iln.report import (
    RunInfo,
    build_report,
    flatten_summary,
    load_paper_numbers,
    load_runs,
    validate_paper_numbers,
)
from iln.report.build import METRICS_ROW_KEYS
from iln.report.crops import largest_difference_box
from iln.report.paper import printed
from iln.report.render import MAX_VALUE_COLUMNS
from iln.report.tables import FILLED_BY, MeasuredOn, fp16_remark
from iln.weights.subject import find_subject
from tests.helpers import ROOT, train_settings, train_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 100, 200, 300)
GROUPS = 3
CHANNELS = 32
PROTOCOL = MeasuredOn(
    probe_set="default_test", probe_images=2, probe_crop=64, precision_crop=48, ema_decay=0.999
)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def feature(layer: str, mag: float, ent: float) -> dict:
    return {
        "layer": layer,
        "magnitude": mag,
        "max_abs": 4 * math.sqrt(mag),
        "entropy": ent,
        "entropy_ceiling": math.log(CHANNELS),
        "token_std_spread": 0.3,
    }


def stats(norm: str, step: int, g: int) -> tuple[float, float]:
    """LN grows and loses entropy with depth and time; everything else stays flat."""
    if norm.startswith("ln") and norm != "ln_star":
        return (1 + step / 100) ** (g + 1), math.log(CHANNELS) - 0.2 * (g + 1) * step / 100
    return 1.2, math.log(CHANNELS) - 0.05


PROBE_HEADER = ["step", "layer", "magnitude", "max_abs", "entropy", "entropy_ceiling"]
PROBE_HEADER += ["token_std_spread"]


def make_run(
    root: Path,
    name: str,
    *,
    norm: str,
    task: str = "sr_x2",
    psnr: float = 30.0,
    sets=("default_test", "Set14"),
    precision: bool = False,
    analysis: str | None = None,  # None | "old" (no weights column) | "both" (ema and raw)
    train: bool = True,
    val_psnr: bool = False,
) -> None:
    run = root / name
    if train:
        probes = []
        for step in STEPS:
            for g in range(GROUPS):
                probes.append({"step": step, **feature(f"group{g}", *stats(norm, step, g))})
            probes.append(
                {"step": step, **feature("final_norm_in", *stats(norm, step, GROUPS - 1))}
            )
        write_csv(run / "train" / "probes.csv", PROBE_HEADER, probes)
        history = [
            {"step": s, "loss": 0.1 / s, "lr": 2e-4, "seconds_per_step": 0.5} for s in STEPS[1:]
        ]
        columns = ["step", "loss", "lr", "seconds_per_step"]
        if val_psnr:
            columns.append("val_psnr")
            for row in history:
                row["val_psnr"] = psnr + row["step"] / 100 if row["step"] % 200 == 0 else ""
        write_csv(run / "train" / "history.csv", columns, history)
        (run / "train" / "summary.json").write_text(
            json.dumps(train_summary((2,) * GROUPS, CHANNELS))
        )
    metrics = {
        f"{task}/{s}": {"psnr": psnr + i, "ssim": 0.8 + 0.01 * i} for i, s in enumerate(sets)
    }
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    if precision:
        collapse = norm == "ln"
        prec = {
            mode: {
                "default_test": {
                    "psnr": psnr - (20 if (mode in ("fp16", "int4") and collapse) else 0),
                    "overflow": mode == "fp16" and collapse,
                }
            }
            for mode in ("fp32", "fp16", "int8", "int4")
        }
        (run / "eval" / "precision.json").write_text(json.dumps(prec))
    if analysis:
        ema = [feature(f"group{g}", 10.0 * (g + 1), 2.5) for g in range(GROUPS)]
        if analysis == "old":
            write_csv(run / "analysis" / "features.csv", list(ema[0]), ema)
        else:
            raw = [feature(f"group{g}", 1000.0 * (g + 1), 2.0) for g in range(GROUPS)]
            rows = [{"weights": "ema", **r} for r in ema] + [{"weights": "raw", **r} for r in raw]
            write_csv(run / "analysis" / "features.csv", list(rows[0]), rows)
        write_csv(
            run / "analysis" / "final_norm.csv",
            ["channel", "bias", "input_mean_abs"],
            [{"channel": c, "bias": 0.1, "input_mean_abs": 1.0} for c in range(CHANNELS)],
        )
        for png in ("final_norm.png", "rpb_first.png", "rpb_last.png"):
            (run / "analysis" / png).write_bytes(PNG_MAGIC)


BASE = {"arch": "hat_tiny", "task": "sr_x2", "seed": 1, "batch_size": 4, "iterations": 300}


def infos(runs: dict[str, dict | RunInfo]) -> dict[str, RunInfo]:
    """The RunInfo of each run given by its fields (lists as tuples)."""
    return {
        name: f
        if isinstance(f, RunInfo)
        else RunInfo(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in f.items()})
        for name, f in runs.items()
    }


def declared_runs() -> dict[str, RunInfo]:
    # a run of the params file: its unset fields come from its train settings
    params = dataclasses.replace(
        load_params(ROOT / "params.yaml"),
        runs={"ln_clip": RunSpec(arch="hat_tiny", norm="ln", task="sr_x2", groups=("table8",))},
        train=train_settings(grad_clip=1.0, seed=1, batch_size=4, iterations=300),
    )
    clip = RunInfo.from_subject(find_subject(params, "ln_clip"), params)
    return infos(
        {
            "ln": {**BASE, "norm": "ln", "groups": ["table3", "table4"]},
            "iln": {**BASE, "norm": "iln", "groups": ["table3", "table4"]},
            "inorm": {**BASE, "norm": "instancenorm", "groups": ["table1"]},
            "ln_star": {**BASE, "norm": "ln_star", "groups": ["table3"]},  # declared, never run
            "ln_rs": {**BASE, "norm": "ln_rs", "groups": ["table3"]},
            "ln_clip": clip,
            "ln_kld": {**BASE, "norm": "ln", "kld_weight": 0.01, "groups": ["table8"]},
            "ln_std": {**BASE, "norm": "ln", "stdnorm": True, "groups": ["stdnorm"]},
            "ln_nostd": {**BASE, "norm": "ln", "groups": ["stdnorm"]},
            "dn_ln": {**BASE, "norm": "ln", "task": "dn_s15"},
            "dn_iln": {**BASE, "norm": "iln", "task": "dn_s15"},
            "sw_car_ln": {**BASE, "arch": "swinir_tiny", "norm": "ln", "task": "car_q20"},
            "sw_car_iln": {**BASE, "arch": "swinir_tiny", "norm": "iln", "task": "car_q20"},
            "hat_car_ln": {**BASE, "norm": "ln", "task": "car_q20"},
            "hat_car_iln": {**BASE, "norm": "iln", "task": "car_q20"},
            "released_iln": {**BASE, "arch": "hat", "norm": "iln", "task": "sr_x2"},
        }
    )


BASELINE = {  # runs/bicubic/eval/metrics.json: bicubic for SR, the degraded input otherwise
    "sr_x2/default_test": {"psnr": 29.5, "ssim": 0.85},
    "sr_x2/Set14": {"psnr": 28.25, "ssim": 0.8},
    "dn_s15/Urban100": {"psnr": 24.61, "ssim": 0.6},
    "car_q20/default_test": {"psnr": 31.0, "ssim": 0.9},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "ln", norm="ln", psnr=30.0, precision=True, analysis="both", val_psnr=True)
    make_run(root, "iln", norm="iln", psnr=30.5, precision=True, analysis="old", val_psnr=True)
    make_run(root, "inorm", norm="instancenorm", psnr=30.3)
    make_run(root, "ln_rs", norm="ln_rs", psnr=30.1)
    make_run(root, "ln_clip", norm="ln", psnr=29.9)
    make_run(root, "ln_kld", norm="ln", psnr=29.0)
    make_run(root, "ln_std", norm="ln", psnr=30.2)
    make_run(root, "ln_nostd", norm="ln", psnr=30.0)
    make_run(root, "dn_ln", norm="ln", task="dn_s15", psnr=33.0, sets=("Urban100",))
    make_run(root, "dn_iln", norm="iln", task="dn_s15", psnr=33.4, sets=("Urban100",))
    for arch, psnr in (("sw", 32.0), ("hat", 32.5)):  # one task and set, two models
        for norm, gain in (("ln", 0.0), ("iln", 0.25)):
            sets = ("default_test",)
            make_run(
                root, f"{arch}_car_{norm}", norm=norm, task="car_q20", psnr=psnr + gain, sets=sets
            )
    # released weights: evaluated and analysed, never trained here (no train/ folder)
    make_run(root, "released_iln", norm="iln", psnr=38.6, sets=("Set5",), train=False)
    (root / "bicubic" / "eval").mkdir(parents=True)
    (root / "bicubic" / "eval" / "metrics.json").write_text(json.dumps(BASELINE))
    out = tmp_path_factory.mktemp("reports")
    summary = build_report(
        declared_runs(),
        root,
        out,
        scale_note="preset hat_tiny, 300 iterations, embedded photos, CPU",
        protocol=PROTOCOL,
    )
    return root, out, summary


def read_table(out: Path, key: str) -> list[dict[str, str]]:
    with (out / "tables" / f"{key}.csv").open() as fh:
        return list(csv.DictReader(fh))


def cell(rows: list[dict[str, str]], row: str, column: str) -> dict[str, str]:
    found = [r for r in rows if r["row"] == row and r["column"] == column]
    assert len(found) == 1, (row, column, {(r["row"], r["column"]) for r in rows})
    return found[0]


def md_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the markdown table in text, its parts (a wide table is split, each
    part repeating the row name and runs columns) joined by row; escaped pipes unescaped."""

    def split(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        return [c.strip().replace("\\|", "|") for c in parts]

    blocks: list[list[list[str]]] = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            blocks[-1].append(split(line))
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    header, rows = blocks[0][0], [list(r) for r in blocks[0][2:]]
    for block in blocks[1:]:
        assert block[0][:2] == header[:2] and [r[0] for r in block[2:]] == [r[0] for r in rows]
        header += block[0][2:]
        for row, more in zip(rows, block[2:], strict=True):
            row += more[2:]
    return header, rows


def md_row(out: Path, key: str, label: str) -> tuple[list[str], list[str]]:
    header, rows = md_table((out / "tables" / f"{key}.md").read_text())
    for cells in rows:
        if cells[0] == label:
            return header, cells
    raise AssertionError(f"no row {label!r} in {key}.md: {[r[0] for r in rows]}")


def report_section(text: str, heading: str) -> str:
    """The report.md text from `### heading` up to the next heading."""
    start = text.index(f"### {heading}\n")
    end = text.find("\n#", start + 4)
    return text[start : end if end >= 0 else None]


# ---------------------------------------------------------------- numbering and paper numbers


def paper_values(prow: dict) -> dict[str, object]:
    return {k: v for k, v in prow.items() if k in ("psnr", "ssim", "max_abs", "finding")}


@pytest.mark.parametrize("with_runs", [True, False])
def test_every_paper_table_appears_under_its_number_and_title_with_its_numbers(
    built, tmp_path, with_runs
):
    """Every table of paper_numbers.yaml is in report.md as "Table N: <title>" with every
    number of the yaml in its CSV, exactly, with or without runs of ours."""
    if with_runs:
        _, out, _ = built
    else:
        out = tmp_path / "report"
        build_report(declared_runs(), tmp_path / "no_runs", out, scale_note="nothing run")
    paper = load_paper_numbers()
    text = (out / "report.md").read_text()
    headings = re.findall(r"^### (Table \w+): (.*)$", text, flags=re.M)
    numbered = dict(headings)
    for key, block in paper["tables"].items():
        number = f"Table {key[len('table') :]}"
        assert numbered.get(number) == block["title"], (number, numbered)
        md = (out / "tables" / f"{key}.md").read_text()
        assert md.startswith(f"# {number}: {block['title']}\n")
        csv_paper = [r["paper"] for r in read_table(out, key) if r["paper"] != ""]
        for prow in block["rows"]:
            for metric, value in paper_values(prow).items():
                if isinstance(value, str):
                    assert value in csv_paper, (key, prow)
                else:
                    assert any(_is_float(p) and float(p) == value for p in csv_paper), (
                        key,
                        metric,
                        value,
                    )
                    assert printed(value) in md, (key, value)
    # the paper's numbering, ours marked S
    assert [n for n, _ in headings] == [
        "Table 1",
        "Table 2",
        "Table 3",
        "Table 4",
        "Table 6",
        "Table 8",
        "Table S1",
        "Table S2",
        "Table S3",
        "Table S4",
    ]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_without_runs_table1_and_table2_show_the_papers_numbers_and_no_run(tmp_path):
    out = tmp_path / "report"
    summary = build_report({}, tmp_path / "empty", out, scale_note="nothing run")
    assert summary["runs"] == {}
    assert summary["tables"]["table1"] == "paper only (no run)"
    header, cells = md_row(out, "table1", "LN")  # the paper's sets: one cell per metric
    assert cells[header.index("PSNR (paper): Set14 / B100 / Urban100 / Manga109")] == (
        "28.79 / 27.68 / 26.55 / 31.01"
    )
    ssim = cells[header.index("SSIM (paper): Set14 / B100 / Urban100 / Manga109")]
    assert ssim.endswith(" / 0.9150")  # as the paper prints it
    assert cells[1] == "no run"
    text = (out / "report.md").read_text()  # in the report: one line, saying what fills it
    section = report_section(text, "Table 1: Normalisation layers compared")
    assert section.strip().splitlines()[2:] == [
        f"No run of ours yet; filled by {FILLED_BY['table1']}; the paper's numbers: "
        "[tables/table1.md](tables/table1.md)."
    ]
    assert "configs/paper_hat_dagger.yaml" in report_section(
        text, "Table 6: Full HAT (HAT†), LN vs i-LN"
    )
    _, inorm = md_row(out, "table1", "InstanceNorm")
    assert any("27.02" in c for c in inorm) and any("0.8136" in c for c in inorm)
    header, cells = md_row(out, "table1", "BN (batch stats in eval)")  # a row, no numbers
    assert cells[1] == "no run"
    header, cells = md_row(out, "table2", "deraining / Rain100L / hat_1")
    assert cells[header.index("LN PSNR / SSIM (paper)")] == "34.35 / 0.9471"
    assert cells[header.index("i-LN PSNR / SSIM (paper)")] == "36.20 / 0.9641"
    assert cells[1] == "no run" and cells[header.index("LN PSNR / SSIM (ours)")] == ""
    assert "*Part" not in (out / "tables" / "table2.md").read_text()  # one page wide
    _, swinir = md_row(out, "table2", "deraining / Test100 / swinir_1")
    assert "27.45 / 0.8766" in swinir and "29.87 / 0.8982" in swinir
    assert all(v.startswith("skipped: no ") for v in summary["figures"].values())
    assert summary["figures"]["fig4_norms_magnitude"] == "skipped: no run in group `table1`"
    assert summary["tables"]["table_s2_seeds"] == "skipped: no run in group `seeds`"


# ---------------------------------------------------------------- our numbers


def test_table1_uses_the_best_run_of_each_norm_and_labels_raw_and_ema(built):
    _, out, _ = built
    rows = read_table(out, "table1")
    ln = cell(rows, "LN", "default_test PSNR")
    assert float(ln["ours"]) == 30.0 and ln["run"] == "ln"  # not the clipped or KL run
    assert float(cell(rows, "InstanceNorm", "default_test PSNR")["ours"]) == 30.3
    # LN: analysis has both weights; raw from it, EMA from it
    assert float(cell(rows, "LN", "deepest magnitude, raw")["ours"]) == 3000.0
    assert float(cell(rows, "LN", "deepest magnitude, EMA")["ours"]) == 30.0
    # i-LN: an old features.csv without the weights column holds EMA; raw = the last probe
    assert float(cell(rows, "i-LN", "deepest magnitude, EMA")["ours"]) == 30.0
    assert float(cell(rows, "i-LN", "deepest magnitude, raw")["ours"]) == 1.2
    # InstanceNorm: no analysis: no EMA statistics, raw from the last probe
    assert cell(rows, "InstanceNorm", "deepest magnitude, EMA")["status"] == "missing"
    header, _ = md_row(out, "table1", "LN")
    assert "deepest magnitude, raw (ours)" in header and "deepest entropy, EMA (ours)" in header
    text = (out / "tables" / "table1.md").read_text()
    assert "'raw' = the weights being trained (final checkpoint, probe at step 300)" in text
    assert "'EMA' = their moving average (decay 0.999)" in text
    assert "from the rest of the grid (ln, iln)" in text  # not in group table1: said so


def test_table2_shows_every_task_we_ran_beside_the_papers(built):
    _, out, _ = built
    rows = read_table(out, "table2")
    dn = "colour denoising σ=15 / Urban100 / hat_1"
    assert float(cell(rows, dn, "LN PSNR")["paper"]) == 35.489
    assert float(cell(rows, dn, "i-LN PSNR")["ours"]) == 33.4
    assert float(cell(rows, dn, "i-LN − LN PSNR (dB)")["ours"]) == pytest.approx(0.4)
    assert float(cell(rows, dn, "i-LN − LN PSNR (dB)")["paper"]) == pytest.approx(0.069)
    sr = "SR x2 / default_test / hat_tiny"
    assert float(cell(rows, sr, "LN PSNR")["ours"]) == 30.0
    assert float(cell(rows, sr, "i-LN PSNR")["ours"]) == 30.5
    assert cell(rows, "deraining / Rain100L / hat_1", "LN PSNR")["status"] == "no run"
    # one row per model of the same task and set
    assert float(cell(rows, "JPEG CAR q=20 / default_test / hat_tiny", "LN PSNR")["ours"]) == 32.5
    assert (
        float(cell(rows, "JPEG CAR q=20 / default_test / swinir_tiny", "i-LN PSNR")["ours"])
        == 32.25
    )


def test_table2_pairs_drct_runs_with_drct_runs_only(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "hat_ln", norm="ln", psnr=30.0, sets=("default_test",))
    make_run(root, "hat_iln", norm="iln", psnr=30.5, sets=("default_test",))
    make_run(root, "drct_ln", norm="ln", psnr=31.0, sets=("default_test",))
    declared = {
        "hat_ln": {**BASE, "norm": "ln"},
        "hat_iln": {**BASE, "norm": "iln"},
        "drct_ln": {**BASE, "arch": "drct_tiny", "norm": "ln"},
    }
    out = tmp_path / "report"
    build_report(infos(declared), root, out, scale_note="tiny", protocol=PROTOCOL)
    rows = read_table(out, "table2")
    drct = "SR x2 / default_test / drct_tiny"
    assert float(cell(rows, drct, "LN PSNR")["ours"]) == 31.0
    missing = cell(rows, drct, "i-LN PSNR")  # not filled from the HAT i-LN run
    assert missing["status"] == "missing" and missing["ours"] == ""
    assert float(cell(rows, "SR x2 / default_test / hat_tiny", "LN PSNR")["ours"]) == 30.0


def test_table3_marks_a_declared_but_missing_run_no_run(built):
    _, out, _ = built
    header, cells = md_row(out, "table3", "LN*")
    assert cells[1] == "no run" and cells[header.index("default_test PSNR (ours)")] == ""
    rows = read_table(out, "table3")
    assert float(cell(rows, "LN", "B100 PSNR")["paper"]) == 27.7897
    assert float(cell(rows, "i-LN", "Manga109 PSNR")["paper"]) == 32.1694
    assert float(cell(rows, "LN+Rs", "default_test PSNR")["ours"]) == 30.1


def test_table4_has_int4_and_says_it_was_measured_on_crops(built):
    _, out, _ = built
    rows = read_table(out, "table4")
    fp16 = cell(rows, "LN / fp16", "default_test PSNR")
    assert float(fp16["ours"]) == 10.0
    assert cell(rows, "LN / fp16", "default_test overflow")["ours"] == "True"
    assert float(cell(rows, "LN / int4", "default_test PSNR")["ours"]) == 10.0
    assert float(cell(rows, "i-LN / fp16", "Urban100 PSNR")["paper"]) == 27.5849
    text = (out / "tables" / "table4.md").read_text()
    assert "central 48x48-pixel LR crops of default_test (HR 96 pixels)" in text
    assert "EMA weights" in text


def test_every_psnr_table_has_the_baseline(built):
    """Tables 1 and 3: a bicubic row on the same sets; Table 2: the baseline beside each
    pair, bicubic for SR and the degraded input for denoising."""
    _, out, _ = built
    for key in ("table1", "table3"):
        header, cells = md_row(out, key, "bicubic (baseline)")
        assert cells[1] == "bicubic"
        assert cells[header.index("default_test PSNR (ours)")] == "29.50"
        assert cells[header.index("Set14 SSIM (ours)")] == "0.8000"
        assert cells[header.index("deepest magnitude, raw (ours)")] == "–"  # no model
    header, cells = md_row(out, "table2", "SR x2 / default_test / hat_tiny")
    assert cells[header.index("bicubic / input PSNR (ours)")] == "29.50"
    header, cells = md_row(out, "table2", "colour denoising σ=15 / Urban100 / hat_1")
    assert cells[header.index("bicubic / input PSNR (ours)")] == "24.61"
    assert "the degraded input itself" in (out / "tables" / "table2.md").read_text()


def test_wide_tables_are_split_into_parts_that_fit_a_page(built):
    _, out, _ = built
    text = (out / "tables" / "table1.md").read_text()
    assert "*Part 1 of 2.*" in text and "*Part 2 of 2.*" in text
    widths = {line.count(" | ") + 1 for line in text.splitlines() if line.startswith("| ")}
    assert max(widths) <= 2 + MAX_VALUE_COLUMNS
    header, rows = md_table(text)  # every column is in one of the parts
    assert {"Set14 PSNR (paper)", "Set14 PSNR (ours)", "finding (paper)"} <= set(header)
    # the paper's number and ours side by side: adjacent columns of one part
    assert header.index("Set14 PSNR (ours)") == header.index("Set14 PSNR (paper)") + 1
    merged = "PSNR (paper): B100 / Urban100 / Manga109"  # sets only the paper has: one cell
    assert rows[0][header.index(merged)] == "27.68 / 26.55 / 31.01"
    # a column of ours with one value in every row is said once, under the table
    assert "entropy ceiling ln C (ours)" not in header
    assert "- entropy ceiling ln C (ours): 3.466 in every row with a run." in text
    s4 = (out / "tables" / "table_s4_runs.md").read_text()
    assert "- iterations (ours): 300 in every row with a run." in s4 and "*Part" not in s4


def test_the_ema_sentence_gives_the_share_of_the_initial_weights(built):
    _, out, _ = built
    assert "0.999^300 = 74%" in (out / "tables" / "table1.md").read_text()


def test_fp16_says_whether_lns_overflow_is_reproduced(built):
    _, out, _ = built
    rows = read_table(out, "table4")
    assert cell(rows, "LN / fp16", "at this scale")["ours"].startswith("reproduced")
    small = {
        "fp32": {"Set5": {"psnr": 27.12, "overflow": False}},
        "fp16": {"Set5": {"psnr": 27.11, "overflow": False}},
    }
    assert fp16_remark(small) == (
        "not reproduced at this scale: no overflow, fp16 vs fp32 Set5 27.11 vs 27.12 dB "
        "(LN's features stay far inside fp16's range here)"
    )
    assert fp16_remark({"fp32": small["fp32"]}) is None


def test_timings_say_under_what_load_they_were_taken(built):
    _, out, _ = built
    assert "no speed comparison between norms" in (out / "tables" / "table_s4_runs.md").read_text()


def test_metrics_rows_have_the_same_few_keys_per_run(built):
    _, _, summary = built
    rows = summary["metrics"]
    assert set(rows["ln"]) == set(METRICS_ROW_KEYS)
    assert rows["ln"]["psnr"] == 30.0 and rows["ln"]["step"] == 300
    assert rows["bicubic_sr_x2"] == {"psnr": 29.5, "ssim": 0.85}
    assert rows["bicubic_dn_s15"] == {"psnr": 24.61, "ssim": 0.6}
    assert set(rows["released_iln"]) == {"psnr", "ssim"}  # never trained here
    assert all(set(row) <= set(METRICS_ROW_KEYS) for row in rows.values())


def test_table8_rows_are_the_papers_stabilisers(built):
    _, out, _ = built
    rows = read_table(out, "table8")
    assert float(cell(rows, "LN", "max |x|, raw")["paper"]) == 5.8e6
    clipped = cell(rows, "LN + gradient clipping", "max |x|, raw")
    assert float(clipped["paper"]) == 5.6e6 and clipped["run"] == "ln_clip"
    assert float(clipped["ours"]) == pytest.approx(4 * math.sqrt(4.0**3))
    kld = cell(rows, "LN + KL-divergence regulariser", "finding")
    assert kld["paper"] == "stable, but clearly lower PSNR" and kld["run"] == "ln_kld"
    assert float(cell(rows, "LN", "max |x| during training")["ours"]) == pytest.approx(
        4 * math.sqrt(4.0**3)
    )
    header, cells = md_row(out, "table8", "LN")  # the pipes of |x| are escaped in markdown
    assert cells[header.index("max |x|, raw (paper)")] == "5.8e+6" and len(cells) == len(header)


def test_table6_takes_full_hat_runs_only(built):
    _, out, _ = built
    rows = read_table(out, "table6")
    set5 = cell(rows, "SR x2 / Set5", "i-LN PSNR")
    assert float(set5["paper"]) == 38.65 and float(set5["ours"]) == 38.6
    assert set5["run"] == "released_iln"  # a run without train/ is read like any other
    assert cell(rows, "SR x2 / Set5", "LN PSNR")["ours"] == ""


def test_report_md_states_the_scale_first_and_why_things_are_skipped(built):
    _, out, summary = built
    text = (out / "report.md").read_text()
    head = "\n".join(text.splitlines()[:4])
    assert "Scale of these results: preset hat_tiny, 300 iterations, embedded photos, CPU" in head
    assert (
        "**Headline: each norm's change from its own step 0** (deepest group's feature "
        "magnitude, mean x², raw weights, first to last training probe; entropy ceiling ln C "
        "= 3.47): LN (`ln`) grows x64 (1 at step 0 → 64 at step 300), entropy 3.47 → 1.67 "
        "nats; i-LN (`iln`) stays within 2x of its step-0 value, x1 (1.2 at step 0 → 1.2 at "
        "step 300)"
    ) in text
    assert "LN / i-LN" not in text and "x the feature magnitude of" not in text
    assert summary["tables"]["table_s2_seeds"] == "skipped: no run in group `seeds`"
    assert summary["figures"]["fig4_norms_magnitude"] == "written"  # inorm is in table1
    assert "![fig1_magnitude_vs_iteration](figures/fig1_magnitude_vs_iteration.png)" in text
    assert "../" in text and "rpb_first.png" in text  # links to the runs' analysis figures
    for heading in ("Table 1: Normalisation layers compared", "Table 4: Low-precision inference"):
        section = report_section(text, heading)
        assert "*What it shows:*" in section and "*Ours measured on:*" in section


def test_figures_are_written_and_skipped_with_the_reason(built, tmp_path):
    _, out, summary = built
    for name in (
        "fig1_magnitude_vs_iteration",
        "fig1_entropy_vs_iteration",
        "fig7_per_group_last_probe",
        "fig8_stabilisers_max_abs",
        "figS1_stdnorm_magnitude",
        "figS2_loss_val_psnr",
    ):
        assert summary["figures"][name] == "written", name
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(out.rglob("*.tmp"))
    # a group declared but without probes yet says so, naming its runs
    root = tmp_path / "runs"
    make_run(root, "ln", norm="ln", train=False)
    runs = {"ln": {**BASE, "norm": "ln", "groups": ["table1"]}}
    summary = build_report(infos(runs), root, tmp_path / "out", scale_note="-")
    assert summary["figures"]["fig4_norms_magnitude"] == (
        "skipped: no run in group `table1` (ln) has probes.csv yet"
    )
    assert summary["figures"]["fig8_stabilisers_max_abs"] == "skipped: no run in group `table8`"


def test_crop_panels_are_labelled_figures(tmp_path):
    rng = np.random.default_rng(0)
    root, pairs = tmp_path / "runs", tmp_path / "pairs"
    gt = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    write_png(pairs / "gt" / "a.png", gt)
    write_png(pairs / "lq" / "a.png", gt[::2, ::2])
    for name, norm in (("bicubic", None), ("ln", "ln"), ("iln", "iln")):
        if norm:
            make_run(root, name, norm=norm, sets=("default_test",), train=False)
        noisy = np.clip(gt.astype(int) + rng.integers(-9, 9, gt.shape), 0, 255).astype(np.uint8)
        write_png(root / name / "eval" / "samples" / "sr_x2" / "default_test" / "a.png", noisy)
    runs = {n: {**BASE, "norm": n, "groups": []} for n in ("ln", "iln")}
    out = tmp_path / "out"
    summary = build_report(
        infos(runs),
        root,
        out,
        scale_note="-",
        pair_dirs=lambda task, s: (pairs / "lq", pairs / "gt"),
    )
    assert summary["figures"]["crops sr_x2/default_test"] == "written"
    assert (out / "figures" / "crops_sr_x2_default_test_a.png").read_bytes().startswith(PNG_MAGIC)
    assert (
        "![crops_sr_x2_default_test_a](figures/crops_sr_x2_default_test_a.png)"
        in (out / "report.md").read_text()
    )


def test_summary_has_final_numbers_per_run(built):
    _, _, summary = built
    runs = summary["runs"]
    assert "ln_star" not in runs
    assert runs["ln"]["deepest_magnitude_raw"] == 3000.0
    assert runs["ln"]["deepest_magnitude_ema"] == 30.0
    assert runs["ln_rs"]["deepest_magnitude_raw"] == pytest.approx(4.0**3)
    assert runs["iln"]["psnr"] == {"default_test": 30.5, "Set14": 31.5}
    flat = flatten_summary(summary)
    assert flat["ln/psnr/Set14"] == 31.0 and flat["iln/deepest_entropy_ema"] == 2.5
    json.dumps(summary, allow_nan=False)  # valid strict JSON for a DVC metrics file


def test_history_val_psnr_is_optional(tmp_path):
    make_run(tmp_path, "a", norm="ln", val_psnr=True)
    make_run(tmp_path, "b", norm="ln")
    runs = {n: {**BASE, "norm": "ln"} for n in ("a", "b")}
    results = load_runs(infos(runs), tmp_path)
    assert results["a"].history_curve("val_psnr") == ([200], [32.0])
    assert results["b"].history_curve("val_psnr") == ([], [])


def test_a_null_metric_reads_as_missing(tmp_path):
    """Strict JSON writes a non-finite PSNR (identical images) as null."""
    make_run(tmp_path, "ln", norm="ln", sets=("default_test",))
    (tmp_path / "ln" / "eval" / "metrics.json").write_text(
        '{"sr_x2/default_test": {"psnr": null, "ssim": 1.0}}'
    )
    run = load_runs(infos({"ln": {**BASE, "norm": "ln"}}), tmp_path)["ln"]
    assert run.metric("default_test", "psnr") is None
    assert run.metric("default_test", "ssim") == 1.0


def test_sets_filter_orders_and_limits_our_columns(tmp_path):
    make_run(tmp_path / "runs", "ln", norm="ln", sets=("default_test", "Set14", "B100"))
    runs = {"ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "groups": ["table1"]}}
    results = load_runs(infos(runs), tmp_path / "runs", sets=("B100", "default_test"))
    assert results["ln"].sets() == ["B100", "default_test"]


def test_malformed_inputs_name_the_file(tmp_path):
    runs = infos({"ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2"}})
    make_run(tmp_path, "ln", norm="ln")
    (tmp_path / "ln" / "eval" / "metrics.json").write_text('{"sr_x2/Set5": {"psnr": "high"}}')
    with pytest.raises(ValueError, match=r"metrics\.json.*psnr"):
        load_runs(runs, tmp_path)
    (tmp_path / "ln" / "eval" / "metrics.json").write_text("{}")
    write_csv(
        tmp_path / "ln" / "train" / "probes.csv",
        ["step", "layer"],
        [{"step": 0, "layer": "group0"}],
    )
    with pytest.raises(ValueError, match=r"probes\.csv.*magnitude"):
        load_runs(runs, tmp_path)
    make_run(tmp_path / "b", "ln", norm="ln", analysis="both")
    features = tmp_path / "b" / "ln" / "analysis" / "features.csv"
    features.write_text(features.read_text().replace("raw,", "final,"))
    with pytest.raises(ValueError, match=r"features\.csv, line \d+: weights must be"):
        load_runs(runs, tmp_path / "b")
    make_run(tmp_path / "c", "ln", norm="ln")
    summary = tmp_path / "c" / "ln" / "train" / "summary.json"
    summary.write_text(json.dumps({**train_summary((2,), 8), "model": {"depths": [2, 2]}}))
    with pytest.raises(ValueError, match=r"summary\.json: 'model' must be .*'embed_dim'"):
        load_runs(runs, tmp_path / "c")


def test_the_report_imports_no_model_or_training_code():
    """The report reads what the stages wrote: building it needs neither torch nor the
    models (a fresh interpreter, so other tests' imports do not count)."""
    code = (
        "import sys, iln.report, iln.report.build; "
        "print([m for m in sys.modules if m == 'torch' or m.startswith(('iln.models', "
        "'iln.training.loop'))])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(iln.__file__).parents[1])}
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert found.stdout.strip() == "[]"


def test_paper_numbers_file_is_valid_and_strict():
    paper = load_paper_numbers()
    assert "design notes" not in json.dumps(paper)  # cites the paper, not our notes
    assert all(
        block["source"].startswith("the paper's Table") for block in paper["tables"].values()
    )
    broken = copy.deepcopy(paper)
    broken["tables"]["table8"]["rows"][0]["max_abs"] = "5.8e6"  # what YAML 1.1 makes of 5.8e6
    with pytest.raises(ValueError, match=r"tables\.table8\.rows\[0\]\.max_abs: expected a number"):
        validate_paper_numbers(broken)
    broken = copy.deepcopy(paper)
    del broken["tables"]["table2"]["source"]
    with pytest.raises(ValueError, match="table2: missing key 'source'"):
        validate_paper_numbers(broken)
    broken = copy.deepcopy(paper)
    broken["tables"]["table1"]["rows"][0]["psnr_y"] = 1.0
    with pytest.raises(ValueError, match=r"table1\.rows\[0\]: unknown key\(s\) \['psnr_y'\]"):
        validate_paper_numbers(broken)


def test_every_norm_has_its_own_colour():
    colours = [s.color for s in NORM_STYLES.values()]
    assert len(set(colours)) == len(colours)
    assert len({s.label for s in NORM_STYLES.values()}) == len(NORM_STYLES)


def test_the_crop_box_is_where_two_restorations_differ_most():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    b = a.copy()
    b[20:28, 30:38] = 0  # the planted difference
    assert largest_difference_box(a, b, size=8, scale=2) == (20, 30, 8, 8)
    assert largest_difference_box(a, a, size=8, scale=2) == (0, 0, 8, 8)  # ties: top-left
    assert largest_difference_box(a, b, size=8, scale=4)[:2] == (20, 28)  # corners on x4
    with pytest.raises(ValueError, match="exceeds"):
        largest_difference_box(a, b, size=41)
    with pytest.raises(ValueError, match="one shape"):
        largest_difference_box(a, b[:30], size=8)


def test_report_html_embeds_the_figures_and_ends_with_the_mlflow_link(built, tmp_path):
    _, out, _ = built
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    # every figure, and every linked PNG (the runs' analysis figures), is in the page
    figures = md.count("](figures/") - md.count(".svg)")
    linked_png = len(re.findall(r"\]\([^)]*\.png\)", md))
    assert figures > 0 and linked_png > figures
    assert page.count('src="data:image/png;base64,') == linked_png
    assert "![" not in page and "<table>" in page and "<h3>Table 1:" in page
    # no link that resolves nowhere in MLflow's artifact viewer (a sandboxed blob page)
    assert re.findall(r'(?:href|src)="(?!https?://|data:image/png;base64,)', page) == []
    assert "<code>tables/table1.csv</code>" in page
    root = tmp_path / "runs"
    make_run(root, "ln", norm="ln")
    link = "http://127.0.0.1:5123/#/experiments/1/runs?compareRunsMode=CHART&viewStateShareKey=k"
    build_report(
        infos({"ln": {**BASE, "norm": "ln"}}),
        root,
        tmp_path / "out",
        scale_note="-",
        mlflow=("iln ui --port 5123", link),
    )
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.rstrip().endswith(f"<{link}>")
    assert "`iln ui --port 5123`" in text
    page = (tmp_path / "out" / "report.html").read_text()
    escaped = link.replace("&", "&amp;")
    assert f'<a href="{escaped}">{escaped}</a>' in page


# ---------------------------------------------------------------- dynamics from step 0


def _probe_run(root: Path, name: str, norm: str, magnitudes: list[float], entropy=3.0) -> None:
    """A run whose deepest group (group1) has the given magnitude at steps 0, 100, ..."""
    rows = [
        {"step": 100 * i, **feature(layer, mag if layer == "group1" else 1.0, entropy)}
        for i, mag in enumerate(magnitudes)
        for layer in ("group0", "group1")
    ]
    write_csv(root / name / "train" / "probes.csv", PROBE_HEADER, rows)


@pytest.mark.parametrize(
    "iln_magnitudes, claim, not_claimed",
    [
        # i-LN as in the paper: flat
        (
            [0.64, 0.7, 0.9],
            "i-LN stays within 2x of its step-0 value, x1.4 (0.64 at step 0 →",
            "shrinks",
        ),
        # i-LN as in our default run: shrinking 25-fold
        (
            [0.64, 0.092, 0.0256],
            "i-LN shrinks 25-fold, to x0.04 (0.64 at step 0 → 0.0256 at step 200)",
            "stays within",
        ),
    ],
)
def test_captions_say_what_each_norm_did_from_its_own_step_0(
    tmp_path, iln_magnitudes, claim, not_claimed
):
    """The headline and Fig. 1's caption are computed from the probes: "stays within 2x"
    only for data that do, the measured factor otherwise; no cross-norm ratio."""
    root = tmp_path / "runs"
    _probe_run(root, "ln", "ln", [2.1, 300.0, 1407.0])
    _probe_run(root, "iln", "iln", iln_magnitudes)
    runs = {n: {**BASE, "norm": n, "groups": ["table3"]} for n in ("ln", "iln")}
    build_report(infos(runs), root, tmp_path / "out", scale_note="-")
    text = (tmp_path / "out" / "report.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("**Headline"))
    caption = report_section(text, "Feature magnitude vs iteration (paper Fig. 1, top)")
    for sentence in (head, caption):
        assert "LN grows x670 (2.1 at step 0 → 1.41e+03 at step 200)" in sentence.replace(
            " (`ln`)", ""
        )
        assert claim in sentence.replace(" (`iln`)", "")
        assert not_claimed not in sentence.split("i-LN")[1]
    assert "fixed scale" not in text and "LN / i-LN" not in text


def test_growth_phrases_follow_the_factor():
    from iln.report.dynamics import Change, growth_phrase

    assert growth_phrase(Change(0, 1.0, 600, 1.9)).startswith("stays within 2x")
    assert growth_phrase(Change(0, 1.0, 600, 0.51)).startswith("stays within 2x")
    assert growth_phrase(Change(0, 1.0, 600, 2.1)).startswith("grows x2.1")
    assert growth_phrase(Change(0, 0.64, 600, 0.0257)).startswith("shrinks 25-fold, to x0.04")


def test_a_psnr_below_the_baseline_is_marked_in_its_row(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "ln", norm="ln", psnr=31.34, sets=("default_test",), train=False)
    make_run(root, "iln", norm="iln", psnr=34.12, sets=("default_test",), train=False)
    (root / "bicubic" / "eval").mkdir(parents=True)
    (root / "bicubic" / "eval" / "metrics.json").write_text(
        json.dumps({"sr_x2/default_test": {"psnr": 33.565, "ssim": 0.9}})
    )
    runs = {n: {**BASE, "norm": n, "groups": ["table3"]} for n in ("ln", "iln")}
    build_report(infos(runs), root, tmp_path / "out", scale_note="-")
    out = tmp_path / "out"
    header, cells = md_row(out, "table2", "SR x2 / default_test / hat_tiny")
    ln = cells[header.index("LN PSNR / SSIM (ours)")]
    assert ln == "31.34 / 0.8000 (below bicubic 33.56)"
    assert cells[header.index("i-LN − LN PSNR (dB) (ours)")] == "2.78 (LN below bicubic)"
    assert cells[header.index("i-LN PSNR / SSIM (ours)")] == "34.12 / 0.8000"
    header, cells = md_row(out, "table3", "LN")
    assert cells[header.index("default_test PSNR (ours)")] == "31.34 (below bicubic 33.56)"


def test_table8_puts_the_papers_iln_magnitude_beside_ours_with_the_factor(tmp_path):
    root = tmp_path / "runs"
    _probe_run(root, "iln", "iln", [0.64, 0.1, 0.0257])
    runs = {"iln": {**BASE, "norm": "iln", "groups": ["table8"]}}
    build_report(infos(runs), root, tmp_path / "out", scale_note="-")
    text = (tmp_path / "out" / "tables" / "table8.md").read_text()
    assert (
        "- The paper's i-LN 'magnitude about 1.2' (its Fig. 1: mean x², HAT_1 after 300K "
        "iterations) against ours: i-LN's deepest group ends at 0.0257 (`iln`, raw weights), "
        "x0.021 of it; from its step-0 value it shrinks 25-fold, to x0.04 (0.64 at step 0 → "
        "0.0257 at step 200)."
    ) in text


def test_figures_are_200_dpi_pngs_with_an_svg_beside_in_the_norm_colours(built):
    _, out, _ = built
    png = out / "figures" / "fig1_magnitude_vs_iteration.png"
    data = png.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (9 * 200, round(4.6 * 200))  # the figure's inches at 200 dpi
    svg = png.with_suffix(".svg").read_text()
    assert "deepest group" in svg and "group2" not in svg  # the legend names it
    assert NORM_STYLES["ln"].color in svg and NORM_STYLES["iln"].color in svg
    text = (out / "report.md").read_text()
    assert (
        "[figures/fig1_magnitude_vs_iteration.svg](figures/fig1_magnitude_vs_iteration.svg)" in text
    )
    loss = (out / "figures" / "figS2_loss_val_psnr.svg").read_text()
    assert "solid: centred mean of 3 rows" in loss  # the smoothing is named on the figure


def test_each_filling_overlay_declares_runs_of_its_group():
    from iln.report.figures import FIGURES

    texts = {
        **FILLED_BY,
        **{f.name: f"group `{f.group}` {f.filled_by}" for f in FIGURES if f.filled_by},
    }
    for key, text in texts.items():
        for config in re.findall(r"configs/[a-z0-9_]+\.yaml", text):
            assert (ROOT / config).exists(), (key, config)
            group = re.search(r"group `(\w+)`", text)
            if group:
                assert f"{group.group(1)}" in (ROOT / config).read_text(), (key, config)
