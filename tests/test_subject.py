"""``iln.weights.subject``: a trained run, a released checkpoint and the baseline found by one lookup
and opened one way; the report can use it without importing torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from iln.config.params import ParamsError, load_params
from iln.config.layout import Layout
from iln.config.overlay import apply_file
from iln.weights.subject import find_subject, open_model, subjects
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    """The default runs plus the released checkpoints' entries (configs/released.yaml's)."""
    out = tmp_path_factory.mktemp("subject") / "params.yaml"
    apply_file(ROOT / "configs/released.yaml", ROOT / "params.yaml", out)
    released = load_params(out).released
    default = load_params(ROOT / "params.yaml")
    return dataclasses.replace(default, released=released)


def test_each_name_is_found_as_its_kind(params):
    run, entry = next(iter(params.runs)), next(iter(params.released))
    assert find_subject(params, run).kind == "trained"
    assert find_subject(params, run).spec is params.runs[run]
    assert find_subject(params, entry).kind == "released"
    assert find_subject(params, "bicubic").kind == "baseline"
    assert find_subject(params, "bicubic").spec is None
    assert [s.name for s in subjects(params)] == [*params.runs, *params.released]


def test_an_unknown_name_lists_what_there_is(params):
    with pytest.raises(ParamsError) as err:
        find_subject(params, "nope")
    message = str(err.value)
    assert "'nope': no such run, released entry or baseline" in message
    assert all(name in message for name in [*params.runs, *params.released, "bicubic"])


def test_the_precision_table_is_for_released_entries_and_table4_runs(params):
    for s in subjects(params):
        expected = s.kind == "released" or "table4" in s.spec.groups
        assert s.precision_table == expected
    assert not find_subject(params, "bicubic").precision_table


def test_models_that_do_not_exist_are_refused(params, tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(ParamsError, match="the interpolation baseline has no model"):
        open_model(find_subject(params, "bicubic"), layout, torch.device("cpu"))
    entry = find_subject(params, next(iter(params.released)))
    with pytest.raises(ValueError, match="a released checkpoint has no raw weights"):
        open_model(entry, layout, torch.device("cpu"), weights="raw")


def test_finding_subjects_imports_no_torch():
    code = (
        "import sys, iln.weights.subject\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('iln.models')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
