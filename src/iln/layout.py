"""Where every pipeline artefact lives, relative to the project root (one place to change)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def train_dir(self, run: str) -> Path:
        return self.run_dir(run) / "train"

    def checkpoint(self, run: str) -> Path:
        """Resumable training state (a DVC ``persist`` output, kept outside ``runs/``)."""
        return self.root / "checkpoints" / run / "checkpoint.pt"

    def weights(self, run: str) -> Path:
        """Final EMA weights and the model recipe."""
        return self.train_dir(run) / "model.pt"

    def released_record(self, name: str) -> Path:
        """Which weights file a released entry uses (written by its check stage)."""
        return self.run_dir(name) / "weights.json"

    @property
    def weights_book(self) -> Path:
        """SHA-256 of every released weights file, recorded on first use (commit it)."""
        return self.root / "weights" / "checksums.json"

    def eval_dir(self, run: str) -> Path:
        return self.run_dir(run) / "eval"

    def analysis_dir(self, run: str) -> Path:
        return self.run_dir(run) / "analysis"

    @property
    def report_dir(self) -> Path:
        return self.root / "reports"
