"""The README is a front page that points at docs/ by topic; every link resolves, the fault
matrix names tests that exist, and the default-run table is the generated one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from iln.report import frontpage

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"(?m)^#+ (.*)$", text)}


def test_the_readme_is_a_front_page_with_the_two_commands_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:60])
    assert 'pip install -e ".[dev]" && dvc repro' in head
    assert ".venv/bin/python -m pytest" in head
    assert len(list((ROOT / "docs").glob("*.md"))) >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_the_fault_matrix_names_tests_that_exist():
    text = (ROOT / "docs" / "faults.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) > 30
    for file, name in named:
        source = ROOT / "tests" / file
        assert source.exists(), file
        assert f"def {name}(" in source.read_text(), f"{file}::{name}"


def test_the_default_run_table_is_generated_from_the_recorded_run():
    snap = json.loads((ROOT / "docs" / "default-run.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert frontpage.readme_table(readme) == frontpage.render(snap)
    assert {"ln", "iln", "bicubic"} <= set(snap["runs"])


def test_the_snapshot_keeps_what_the_table_shows():
    summary = {
        "ln": {
            "deepest_magnitude_raw": 3150.0,
            "deepest_entropy_raw": 0.651,
            "entropy_ceiling": 3.4657,
            "last_probe_step": 600,
            "psnr": {"default_test": 29.23},
            "max_abs_raw": 1.0,
        }
    }
    table = frontpage.render(frontpage.snapshot(summary, {"psnr": 33.57, "ssim": 0.9}))
    assert "| LN | 3.15e+03 | 0.65 (3.47) | 29.23 |" in table
    assert "| bicubic upsampling | - | - | 33.57 |" in table
