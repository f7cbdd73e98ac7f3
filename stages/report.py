"""DVC stage `report`: every paper table (markdown + CSV) with the paper's numbers beside
ours, the figures, side-by-side crops, and reports/report.md.

    python stages/report.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys

from iln import tracking
from iln.cli import project_root, run_stage
from iln.config import load_params, resolve_run
from iln.files import write_json_atomic
from iln.layout import Layout
from iln.report import build_report, flatten_summary
from iln.report.crops import comparison_panels


def scale_note(params) -> str:
    """One line that says what these numbers are: preset, iterations, data, device."""
    runs = [resolve_run(params, name) for name in params.runs]
    if not runs:
        return (
            f"no training runs: the released checkpoints of `released:` only; test sets "
            f"{', '.join(params.evaluate.sets)}"
        )
    archs = sorted({r.spec.arch for r in runs})
    iterations = sorted({r.train.iterations for r in runs})
    batches = sorted({r.train.batch_size for r in runs})
    return (
        f"presets {', '.join(archs)}; {', '.join(map(str, iterations))} iterations at batch "
        f"{', '.join(map(str, batches))}, LR patch {params.train.lq_patch}; training data "
        f"{params.train.train_set}; test sets {', '.join(params.evaluate.sets)}; device {params.train.device} "
        f"(the paper: HAT_1 and larger, 300K-500K iterations on DF2K, GPUs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    layout = Layout(project_root())
    out = layout.report_dir
    runs = {name: resolve_run(params, name) for name in params.runs}
    (out / "figures").mkdir(parents=True, exist_ok=True)  # a DVC output, even when empty
    with tracking.stage_run(
        layout.root, experiment=params.tracking.experiment, stage="report", run_name="report"
    ) as tracker:
        summary = build_report(
            runs,
            layout.root / "runs",
            out,
            scale_note=scale_note(params),
            sets=params.report.sets,
            released=params.released,
        )
        for task in sorted(
            {spec.task for spec in params.runs.values() if spec.task.startswith("sr_x")}
        ):
            pick = {
                norm: next(
                    (
                        n
                        for n in sorted(params.runs)
                        if params.runs[n].norm == norm and params.runs[n].task == task
                    ),
                    None,
                )
                for norm in ("ln", "iln")
            }
            if None in pick.values():
                continue
            for dataset in params.report.sets:
                sample = lambda run: layout.eval_dir(run) / "samples" / task / dataset  # noqa: E731
                lq_dir, gt_dir = layout.pair_dirs(task, dataset)
                comparison_panels(
                    lq_dir=lq_dir,
                    gt_dir=gt_dir,
                    scale=int(task[len("sr_x") :]),
                    samples={
                        "Bicubic": sample("bicubic"),
                        "LN": sample(pick["ln"]),
                        "i-LN": sample(pick["iln"]),
                    },
                    out_dir=out / "figures",
                    prefix=f"crops_{task}_{dataset}",
                    contrast=("LN", "i-LN"),
                )
        write_json_atomic(out / "summary.json", summary["runs"])
        tracker.log_metrics(flatten_summary(summary))
        tracker.log_artifact(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("report", main))
