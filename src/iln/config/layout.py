"""Every pipeline artefact: where it lives (relative to the project root) and what is in it.

The one place that stages (writers) and the report (reader) take file names and column
schemas from; `tests/test_layout.py` checks that dvc.yaml declares exactly these outputs.

Per run ``R`` (one entry of ``runs:`` in params.yaml)::

    checkpoints/R/checkpoint.pt    resumable training state (DVC persist, not under runs/)
    runs/R/train/model.pt          final EMA weights and the model recipe
    runs/R/train/history.csv       HISTORY_COLUMNS, one row per logged step
    runs/R/train/probes.csv        PROBES_CSV_COLUMNS, one row per (probe step, layer)
    runs/R/train/summary.json      TRAIN_SUMMARY_KEYS
    runs/R/eval/metrics.json       {"<task>/<set>": {METRICS_KEYS}}
    runs/R/eval/per_image.csv      PER_IMAGE_COLUMNS
    runs/R/eval/precision.json     {"<mode>": {"<set>": {PRECISION_KEYS, ...}}} ({} outside Table 4)
    runs/R/eval/samples/<task>/<set>/<image>.png   the first restored images
    runs/R/analysis/features.csv   FEATURES_COLUMNS, final-checkpoint statistics per layer
    runs/R/analysis/final_norm.csv FINAL_NORM_COLUMNS
    runs/R/analysis/*.png          ANALYSIS_FIGURES, each with an .svg of the same name beside it
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path

from iln.data.catalog import parts_of
from iln.data.params import ON_THE_FLY, parse_task

# ---- inference precision

# The formats of the inference-precision table (paper Table 4), in the order it shows them:
# evaluate.precision_modes takes these, iln.evaluation.precision computes them, the report
# lists them.
PrecisionMode = typing.Literal["fp32", "fp16", "bf16", "int8", "int4"]
PRECISION_MODES: tuple[str, ...] = typing.get_args(PrecisionMode)

# ---- names

# A run or released entry name: a plain folder name under runs/ that a command line never
# reads as an option (``-h``) and that never leaves runs/ (``..``).
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def check_run_name(name: str, where: str) -> None:
    """ValueError naming ``where`` (the params key) unless ``name`` can name a run folder:
    letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most 100
    characters."""
    if not _RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{where}: {name!r} cannot be used as a name (letters, digits, '_', '-' and '.' "
            f"only, starting with a letter, digit or '_'; at most 100 characters)"
        )


# ---- column schemas and JSON keys

HISTORY_COLUMNS: tuple[str, ...] = ("step", "loss", "lr", "seconds_per_step", "val_psnr")
"""history.csv; ``val_psnr`` (EMA weights, validation images) is empty on rows without one."""
HISTORY_OPTIONAL: tuple[str, ...] = ("val_psnr",)  # absent from files written before it existed

PROBE_COLUMNS: tuple[str, ...] = (
    "layer",
    "magnitude",
    "max_abs",
    "entropy",
    "entropy_ceiling",
    "token_std_spread",
)
"""One row of feature statistics per probed layer (iln.evaluation.probes defines them)."""
PROBES_CSV_COLUMNS: tuple[str, ...] = ("step", *PROBE_COLUMNS)
"""probes.csv: statistics of the weights being trained ("raw"), every probe step."""

WEIGHTS_EMA = "ema"
WEIGHTS_RAW = "raw"
FEATURES_COLUMNS: tuple[str, ...] = ("weights", *PROBE_COLUMNS)
"""features.csv: final-checkpoint statistics; ``weights`` is ``ema`` or ``raw``. A file
without the column predates it and holds the EMA weights (what model.pt stores)."""
FEATURES_OPTIONAL: tuple[str, ...] = ("weights",)

FINAL_NORM_COLUMNS: tuple[str, ...] = ("channel", "bias", "input_mean_abs")
PER_IMAGE_COLUMNS: tuple[str, ...] = ("set", "image", "psnr", "ssim", "psnr_b", "task", "protocol")
"""per_image.csv; ``psnr_b`` only for JPEG artefact removal (empty elsewhere)."""
METRICS_KEYS: tuple[str, ...] = ("psnr", "ssim")
METRICS_OPTIONAL: tuple[str, ...] = ("psnr_b",)  # JPEG artefact removal only
ENSEMBLE_SUFFIX = "_x8"  # a metric of the x8 self-ensemble (evaluate.self_ensemble): psnr_x8
METRICS_ENSEMBLE: tuple[str, ...] = tuple(m + ENSEMBLE_SUFFIX for m in (*METRICS_KEYS, "psnr_b"))
METRICS_ALL: tuple[str, ...] = (*METRICS_KEYS, *METRICS_OPTIONAL, *METRICS_ENSEMBLE)
PER_IMAGE_ENSEMBLE_COLUMNS: tuple[str, ...] = METRICS_ENSEMBLE
"""per_image.csv's extra columns with evaluate.self_ensemble (``psnr_b_x8`` JPEG only)."""
PRECISION_KEYS: tuple[str, ...] = ("psnr", "overflow")  # what the report reads; there are more
TRAIN_SUMMARY_KEYS: tuple[str, ...] = (
    "steps",
    "resumed_from",
    "seconds_per_step",
    "final_loss",
    "parameters",
    "world_size",
    "model",  # the model's resolved hyper-parameters (iln.models.resolve_settings)
    "fingerprint",  # what it was trained under: a fine-tune of it checks it (training.sources)
)  # plus "init" for a run initialised from another (iln.weights.warm_start.WarmStart.summary)
ANALYSIS_FIGURES: tuple[str, ...] = ("final_norm.png", "rpb_first.png", "rpb_last.png")

# ---- the stages' outputs, as dvc.yaml declares them (paths relative to the root)

TRAIN_OUTPUTS: tuple[str, ...] = (
    "checkpoints/{run}",
    "runs/{run}/train/model.pt",
    "runs/{run}/train/probes.csv",
    "runs/{run}/train/summary.json",
    "runs/{run}/train/history.csv",
)
EVALUATE_OUTPUTS: tuple[str, ...] = (
    "runs/{run}/eval/samples",
    "runs/{run}/eval/per_image.csv",
    "runs/{run}/eval/precision.json",
    "runs/{run}/eval/metrics.json",
)
BASELINE_OUTPUTS: tuple[str, ...] = (
    "runs/bicubic/eval/samples",
    "runs/bicubic/eval/per_image.csv",
    "runs/bicubic/eval/metrics.json",
)
ANALYZE_OUTPUTS: tuple[str, ...] = ("runs/{run}/analysis",)
REPORT_OUTPUTS: tuple[str, ...] = (
    "reports/tables",
    "reports/report.md",
    "reports/report.html",
    "reports/summary.json",
    "reports/metrics",
    "reports/figures",
)


def stage_outputs(stage: str, run: str | None = None) -> tuple[str, ...]:
    """The outputs (outs, metrics, plots) of one dvc.yaml stage, for run ``run``."""
    per_run = {"train": TRAIN_OUTPUTS, "evaluate": EVALUATE_OUTPUTS, "analyze": ANALYZE_OUTPUTS}
    if stage in per_run:
        if run is None:
            raise ValueError(f"stage {stage!r} is per run: pass the run name")
        return tuple(p.format(run=run) for p in per_run[stage])
    fixed = {"baseline": BASELINE_OUTPUTS, "report": REPORT_OUTPUTS}
    if stage not in fixed:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(per_run | fixed)}")
    return fixed[stage]


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder (``runs/R``); a folder may hold only some of them
    (a run without training, e.g. released weights, has eval/ and analysis/ only)."""

    folder: Path

    @property
    def train_dir(self) -> Path:
        return self.folder / "train"

    @property
    def weights(self) -> Path:
        """Final EMA weights and the model recipe."""
        return self.train_dir / "model.pt"

    @property
    def history(self) -> Path:
        return self.train_dir / "history.csv"

    @property
    def probes(self) -> Path:
        return self.train_dir / "probes.csv"

    @property
    def train_summary(self) -> Path:
        return self.train_dir / "summary.json"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def per_image(self) -> Path:
        return self.eval_dir / "per_image.csv"

    @property
    def precision(self) -> Path:
        return self.eval_dir / "precision.json"

    def samples(self, task: str, dataset: str) -> Path:
        """Folder of the restored images kept for one task and set."""
        return self.eval_dir / "samples" / task / dataset

    @property
    def analysis_dir(self) -> Path:
        return self.folder / "analysis"

    @property
    def features(self) -> Path:
        return self.analysis_dir / "features.csv"

    @property
    def final_norm(self) -> Path:
        return self.analysis_dir / "final_norm.csv"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def hr(self) -> Path:
        return self.root / "data" / "hr"

    @property
    def pairs(self) -> Path:
        return self.root / "data" / "pairs"

    def pair_dirs(self, task: str, dataset: str) -> tuple[Path, Path]:
        """(lq_dir, gt_dir) of a degraded set."""
        base = self.pairs / task / dataset
        return base / "lq", base / "gt"

    def training_sources(self, task: str, train_set: str) -> list[Path]:
        """The folders a run's training reads: the clean HR images of every part of
        ``train_set`` for DN / CAR / real-world SR (degraded on the fly), else the stored
        (lq_dir, gt_dir) pairs."""
        if parse_task(task).kind in ON_THE_FLY:
            return [self.hr / part for part in parts_of(train_set)]
        return list(self.pair_dirs(task, train_set))

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run: str) -> Path:
        return self.runs_dir / run

    def run_files(self, run: str) -> RunFiles:
        return RunFiles(self.run_dir(run))

    def train_dir(self, run: str) -> Path:
        return self.run_files(run).train_dir

    def checkpoint(self, run: str) -> Path:
        """Resumable training state (a DVC ``persist`` output, kept outside ``runs/``)."""
        return self.root / "checkpoints" / run / "checkpoint.pt"

    def weights(self, run: str) -> Path:
        """Final EMA weights and the model recipe."""
        return self.run_files(run).weights

    def released_record(self, name: str) -> Path:
        """Which weights file a released entry uses (written by its check stage)."""
        return self.run_dir(name) / "weights.json"

    @property
    def weights_book(self) -> Path:
        """SHA-256 of every released weights file, recorded on first use (commit it)."""
        return self.root / "weights" / "checksums.json"

    def eval_dir(self, run: str) -> Path:
        return self.run_files(run).eval_dir

    def analysis_dir(self, run: str) -> Path:
        return self.run_files(run).analysis_dir

    @property
    def report_dir(self) -> Path:
        return self.root / "reports"
