"""The report from a synthetic runs folder: paper numbers beside ours, missing runs, figures."""

from __future__ import annotations

import copy
import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from iln.report import (
    build_report,
    flatten_summary,
    load_paper_numbers,
    load_runs,
    validate_paper_numbers,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 100, 200, 300)
GROUPS = 3
CHANNELS = 32


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


def make_run(
    root: Path,
    name: str,
    *,
    norm: str,
    task: str = "sr_x2",
    psnr: float = 30.0,
    sets=("default_test", "Set14"),
    precision: bool = False,
    analysis: bool = False,
) -> None:
    run = root / name
    probes = []
    for step in STEPS:
        for g in range(GROUPS):
            probes.append({"step": step, **feature(f"group{g}", *stats(norm, step, g))})
        probes.append({"step": step, **feature("final_norm_in", *stats(norm, step, GROUPS - 1))})
    write_csv(
        run / "train" / "probes.csv",
        ["step", "layer", "magnitude", "max_abs", "entropy", "entropy_ceiling", "token_std_spread"],
        probes,
    )
    write_csv(
        run / "train" / "history.csv",
        ["step", "loss", "lr", "seconds_per_step"],
        [{"step": s, "loss": 0.1, "lr": 2e-4, "seconds_per_step": 0.5} for s in STEPS[1:]],
    )
    metrics = {
        f"{task}/{s}": {"psnr": psnr + i, "ssim": 0.8 + 0.01 * i} for i, s in enumerate(sets)
    }
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    if precision:
        prec = {
            mode: {
                "Urban100": {
                    "psnr": psnr - (20 if (mode == "fp16" and norm == "ln") else 0),
                    "overflow": mode == "fp16" and norm == "ln",
                }
            }
            for mode in ("fp32", "fp16")
        }
        (run / "eval" / "precision.json").write_text(json.dumps(prec))
    if analysis:
        final = [feature(f"group{g}", 1000.0 * (g + 1), 2.0) for g in range(GROUPS)]
        write_csv(run / "analysis" / "features.csv", list(final[0]), final)
        write_csv(
            run / "analysis" / "final_norm.csv",
            ["channel", "bias", "input_mean_abs"],
            [{"channel": c, "bias": 0.1, "input_mean_abs": 1.0} for c in range(CHANNELS)],
        )
        for png in ("final_norm.png", "rpb_first.png", "rpb_last.png"):
            (run / "analysis" / png).write_bytes(PNG_MAGIC)


def declared_runs() -> dict[str, object]:
    base = {"arch": "hat_tiny", "task": "sr_x2", "seed": 1, "batch_size": 4, "iterations": 300}
    return {
        "ln": {**base, "norm": "ln", "groups": ["table1", "table3", "table4", "table8"]},
        # a RunSpec-like object with attributes
        "iln": SimpleNamespace(
            **base,
            norm="iln",
            stdnorm=None,
            affine_outer=None,
            grad_clip=0.0,
            groups=("table1", "table3", "table4", "table8"),
        ),
        "inorm": {**base, "norm": "instancenorm", "groups": ["table1"]},
        "ln_star": {**base, "norm": "ln_star", "groups": ["table3"]},  # declared, never run
        "ln_rs": {**base, "norm": "ln_rs", "groups": ["table3"]},
        # a resolved run: unset spec fields come from its train settings
        "ln_clip": SimpleNamespace(
            spec=SimpleNamespace(
                arch="hat_tiny",
                norm="ln",
                task="sr_x2",
                groups=("table8",),
                stdnorm=None,
                affine_outer=None,
                grad_clip=None,
                seed=None,
                batch_size=None,
                iterations=None,
            ),
            train=SimpleNamespace(grad_clip=1.0, seed=1, batch_size=4, iterations=300),
        ),
        "ln_std": {**base, "norm": "ln", "stdnorm": True, "groups": ["stdnorm"]},
        "ln_nostd": {**base, "norm": "ln", "groups": ["stdnorm"]},
        "dn_ln": {**base, "norm": "ln", "task": "dn_s15"},
        "dn_iln": {**base, "norm": "iln", "task": "dn_s15"},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "ln", norm="ln", psnr=30.0, precision=True, analysis=True)
    make_run(root, "iln", norm="iln", psnr=30.5, precision=True, analysis=True)
    make_run(root, "inorm", norm="instancenorm", psnr=30.3)
    make_run(root, "ln_rs", norm="ln_rs", psnr=30.1)
    make_run(root, "ln_clip", norm="ln", psnr=29.9)
    make_run(root, "ln_std", norm="ln", psnr=30.2)
    make_run(root, "ln_nostd", norm="ln", psnr=30.0)
    make_run(root, "dn_ln", norm="ln", task="dn_s15", psnr=33.0, sets=("Urban100",))
    make_run(root, "dn_iln", norm="iln", task="dn_s15", psnr=33.4, sets=("Urban100",))
    out = tmp_path_factory.mktemp("reports")
    summary = build_report(
        declared_runs(),
        root,
        out,
        scale_note="preset hat_tiny, 300 iterations, embedded photos, CPU",
    )
    return root, out, summary


def read_table(out: Path, key: str) -> list[dict[str, str]]:
    with (out / "tables" / f"{key}.csv").open() as fh:
        return list(csv.DictReader(fh))


def cell(rows: list[dict[str, str]], row: str, column: str) -> dict[str, str]:
    found = [r for r in rows if r["row"] == row and r["column"] == column]
    assert len(found) == 1, (row, column, {(r["row"], r["column"]) for r in rows})
    return found[0]


def md_row(out: Path, key: str, label: str) -> tuple[list[str], list[str]]:
    lines = (out / "tables" / f"{key}.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", table[0].strip("|"))]
    for line in table[2:]:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        if cells[0] == label:
            return header, cells
    raise AssertionError(f"no row {label!r} in {key}.md")


def test_every_table_and_figure_is_written(built):
    _, out, summary = built
    for key in (
        "table1",
        "table2",
        "table3",
        "table4",
        "table6",
        "table8",
        "table_s1_stdnorm",
        "runs",
    ):
        assert summary["tables"][key] == "written", key
        assert (out / "tables" / f"{key}.csv").exists() and (out / "tables" / f"{key}.md").exists()
    for name in (
        "fig1_magnitude_entropy",
        "fig4_magnitude_by_norm",
        "fig7_entropy_ablation",
        "figS1_stdnorm",
    ):
        assert summary["figures"][name] == "written"
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(out.rglob("*.tmp"))


def test_table2_puts_paper_numbers_beside_ours(built):
    _, out, _ = built
    rows = read_table(out, "table2")
    ln = cell(rows, "LN", "Set14 PSNR")
    assert float(ln["paper"]) == 28.79 and float(ln["ours"]) == 31.0 and ln["run"] == "ln"
    assert float(cell(rows, "i-LN", "Manga109 SSIM")["paper"]) == 0.9228
    assert cell(rows, "i-LN", "Manga109 SSIM")["ours"] == ""  # we did not evaluate Manga109
    assert float(cell(rows, "InstanceNorm", "default_test PSNR")["ours"]) == 30.3
    header, cells = md_row(out, "table2", "LN")
    i = header.index("Set14 PSNR (paper)")
    assert header[i + 1] == "Set14 PSNR (ours)" and cells[i] == "28.79" and cells[i + 1] == "31.00"


def test_table3_marks_a_declared_but_missing_run_not_run(built):
    _, out, _ = built
    header, cells = md_row(out, "table3", "LN*")
    assert cells[1] == "not run" and cells[header.index("default_test PSNR (ours)")] == "not run"
    rows = read_table(out, "table3")
    assert float(cell(rows, "LN", "B100 PSNR")["paper"]) == 27.79
    assert float(cell(rows, "LN+Rs", "default_test PSNR")["ours"]) == 30.1
    assert cell(rows, "LN*", "default_test PSNR")["status"] == "not run"


def test_table1_has_features_of_the_final_checkpoint(built):
    _, out, _ = built
    rows = read_table(out, "table1")
    assert [r["row"] for r in rows if r["column"] == "default_test PSNR"] == [
        "LN",
        "i-LN",
        "InstanceNorm",
    ]
    assert (
        float(cell(rows, "LN", "magnitude, deepest group")["ours"]) == 3000.0
    )  # analysis/features.csv
    assert (
        float(cell(rows, "InstanceNorm", "magnitude, deepest group")["ours"]) == 1.2
    )  # last probe step


def test_table8_and_table4(built):
    _, out, _ = built
    rows = read_table(out, "table8")
    assert float(cell(rows, "LN", "max |x| (final)")["paper"]) == 5.8e6
    clipped = cell(rows, "LN + grad clip 1", "max |x| (final)")
    assert float(clipped["paper"]) == 5.6e6 and float(clipped["ours"]) == pytest.approx(
        4 * math.sqrt(4.0**3)
    )
    assert float(cell(rows, "LN", "max |x| (during training)")["ours"]) == pytest.approx(
        4 * math.sqrt(64.0)
    )
    header, cells = md_row(out, "table8", "LN")  # the pipes of |x| are escaped in markdown
    assert cells[header.index("max |x| (final) (paper)")] == "5.8e+06" and len(cells) == len(header)
    rows = read_table(out, "table4")
    fp16 = cell(rows, "LN / fp16", "Urban100 PSNR")
    assert float(fp16["paper"]) == 7.46 and float(fp16["ours"]) == 10.0
    assert cell(rows, "LN / fp16", "Urban100 overflow")["ours"] == "True"


def test_table6_matches_other_tasks_and_leaves_the_rest_not_run(built):
    _, out, _ = built
    rows = read_table(out, "table6")
    label = "dn_s15 / Urban100 (hat_1) [colour denoising]"
    assert float(cell(rows, label, "LN PSNR")["paper"]) == 35.489
    assert float(cell(rows, label, "i-LN PSNR")["ours"]) == 33.4
    assert float(cell(rows, label, "i-LN − LN (dB)")["ours"]) == pytest.approx(0.4)
    assert cell(rows, "derain / Rain100L (hat_1)", "LN PSNR")["status"] == "not run"


def test_report_md_states_the_scale_first_and_skips_missing_groups(built):
    _, out, summary = built
    text = (out / "report.md").read_text()
    head = "\n".join(text.splitlines()[:4])
    assert "Scale of these results: preset hat_tiny, 300 iterations, embedded photos, CPU" in head
    assert summary["tables"]["table_s2_seeds"].startswith("skipped")
    assert "Skipped: no results from runs in group `seeds`" in text
    assert "![fig1_magnitude_entropy](figures/fig1_magnitude_entropy.png)" in text
    assert "../" in text and "rpb_first.png" in text  # links to the runs' analysis figures
    assert "Where the paper's numbers come from" in text


def test_summary_has_final_numbers_per_run(built):
    _, _, summary = built
    runs = summary["runs"]
    assert "ln_star" not in runs
    assert runs["ln"]["deepest_magnitude"] == 3000.0
    assert runs["ln_rs"]["deepest_magnitude"] == pytest.approx(4.0**3)
    assert runs["iln"]["psnr"] == {"default_test": 30.5, "Set14": 31.5}
    flat = flatten_summary(summary)
    assert flat["ln/psnr/Set14"] == 31.0 and flat["iln/deepest_entropy"] == 2.0
    json.dumps(summary, allow_nan=False)  # valid strict JSON for a DVC metrics file


def test_no_results_at_all_shows_paper_numbers_only(tmp_path):
    out = tmp_path / "report"
    summary = build_report(declared_runs(), tmp_path / "empty", out, scale_note="nothing run")
    assert summary["runs"] == {}
    assert summary["tables"]["table2"] == "paper only (not run)"
    assert summary["tables"]["table1"].startswith("skipped")
    assert all(v.startswith("skipped") for v in summary["figures"].values())
    header, cells = md_row(out, "table2", "LN")
    assert cells[header.index("Set14 PSNR (paper)")] == "28.79"
    assert cells[header.index("Set14 PSNR (ours)")] == "not run"


def test_sets_filter_orders_and_limits_our_columns(tmp_path):
    make_run(tmp_path / "runs", "ln", norm="ln", sets=("default_test", "Set14", "B100"))
    runs = {"ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2", "groups": ["table1"]}}
    results = load_runs(runs, tmp_path / "runs", sets=("B100", "default_test"))
    assert results["ln"].sets() == ["B100", "default_test"]


def test_malformed_inputs_name_the_file(tmp_path):
    runs = {"ln": {"arch": "hat_tiny", "norm": "ln", "task": "sr_x2"}}
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
    with pytest.raises(ValueError, match="run 'x'.*norm"):
        load_runs({"x": {"arch": "hat_tiny", "task": "sr_x2"}}, tmp_path)


def test_paper_numbers_file_is_valid_and_strict():
    paper = load_paper_numbers()
    assert paper["tables"]["table2"]["results"]["ln"]["Set14"] == {"psnr": 28.79, "ssim": 0.7876}
    assert paper["tables"]["table8"]["results"]["ln"]["max_abs"] == 5.8e6
    assert all(t["source"] for t in paper["tables"].values())
    broken = copy.deepcopy(paper)
    broken["tables"]["table8"]["results"]["ln"]["max_abs"] = "5.8e6"  # what YAML 1.1 makes of 5.8e6
    with pytest.raises(
        ValueError, match=r"tables\.table8\.results\.ln\.max_abs: expected a number"
    ):
        validate_paper_numbers(broken)
    del broken["tables"]["table2"]["source"]
    with pytest.raises(ValueError, match="table2: missing key 'source'"):
        validate_paper_numbers(broken)
