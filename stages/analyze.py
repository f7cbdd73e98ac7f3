"""DVC stage `analyze@RUN`: statistics of the final model on the fixed probe batch
(feature magnitude / entropy per layer of the EMA and of the trained weights, final-norm
bias vs its input, relative-position-bias tables of the first and last groups).

    python stages/analyze.py RUN [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys

import torch

from iln import tracking
from iln.analysis.final import run_final_analysis
from iln.cli.stage import project_root, run_stage, store_root
from iln.config.params import load_params
from iln.data.dataset import TestPairs
from iln.util.files import remove_stale_temps
from iln.config.layout import Layout
from iln.evaluation.monitor import probe_batch
from iln.util.device import resolve_device
from iln.figures.styles import norm_style
from iln.weights.subject import find_subject, open_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="name of the run under `runs:` or `released:`")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    layout = Layout(project_root())
    remove_stale_temps(layout.analysis_dir(args.run))  # kill -9 leftovers
    device = resolve_device(params.evaluate.device, key="evaluate.device")
    subject = find_subject(params, args.run)
    opened = open_model(subject, layout, device)
    model, spec = opened.model, subject.spec
    # the trained (not averaged) weights beside the EMA ones; a released entry has one set
    raw = (
        open_model(subject, layout, device, weights="raw").model
        if subject.kind == "trained"
        else None
    )
    pairs = list(TestPairs(*layout.pair_dirs(spec.task, params.test_sets(spec.task)[0])))[
        : params.train.probe_images
    ]
    lq = probe_batch([lq for _, lq, _ in pairs], size=2 * params.train.lq_patch).to(device)
    lq = lq[:, : model.in_chans]  # a grey model: the first plane of a grey set

    out = layout.analysis_dir(args.run)
    with tracking.stage_run(
        store_root(),
        experiment=params.tracking.experiment,
        stage="analyze",
        run_name=args.run,
        norm=spec.norm,
        color=norm_style(spec.norm).color,
        params={f"model.{k}": v for k, v in opened.recipe.items()},
        tags=opened.tags,
    ) as tracker:
        result = run_final_analysis(
            model, lq, out, raw=raw, per_block=params.train.probe_per_block, label=args.run
        )
        tracker.log_metrics(result["summary"])  # final/{ema,raw}/<layer>/<stat>
        tracker.log_artifact(out)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_stage("analyze", main))
