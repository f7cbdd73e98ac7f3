"""Paper tables and figures regenerated from the run folders, the paper's numbers beside ours."""

from iln.report.build import build_report, flatten_summary
from iln.report.paper import load_paper_numbers, validate_paper_numbers
from iln.report.runs import RunInfo, RunResults, load_runs

__all__ = [
    "RunInfo",
    "RunResults",
    "build_report",
    "flatten_summary",
    "load_paper_numbers",
    "load_runs",
    "validate_paper_numbers",
]
