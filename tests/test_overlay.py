"""configs/*.yaml are overlays of params.yaml: each holds only what differs from it, composes
into a valid params file, and `iln config` writes that file or refuses, leaving it as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iln.cli.main import main
from iln.config.params import load_params, resolve_run
from iln.config.overlay import GRIDS, MARKER, applied, compose, render

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DEFAULT = ROOT / "params.yaml"


def _base() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def test_compose_merges_mappings_and_replaces_grids_lists_and_values():
    base = {
        "train": {"lr": 1.0, "betas": [0.9, 0.99], "seed": 1},
        "degrade": {"subimages": {"sets": [], "size": 480}},
        "runs": {"a": {"norm": "ln", "iterations": 5}, "b": {"norm": "iln"}},
        "released": {"x": {"arch": "hat"}},
    }
    overlay = {
        "train": {"lr": 2.0, "betas": [0.5, 0.6], "accumulate": 2},
        "degrade": {"subimages": {"sets": ["DF2K"]}},
        "runs": {"c": {"norm": "rmsnorm"}},
        "released": {},
    }
    before = repr((base, overlay))
    assert compose(base, overlay) == {
        "train": {"lr": 2.0, "betas": [0.5, 0.6], "seed": 1, "accumulate": 2},
        "degrade": {"subimages": {"sets": ["DF2K"], "size": 480}},
        "runs": {"c": {"norm": "rmsnorm"}},  # the overlay's runs are the runs
        "released": {},
    }
    assert repr((base, overlay)) == before  # neither input is modified


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_overlay_composes_onto_params_yaml_and_loads(config, tmp_path):
    out = tmp_path / "params.yaml"
    main(["config", str(config), "--params", str(DEFAULT), "--out", str(out)])
    params = load_params(out)
    for name in params.runs:
        assert resolve_run(params, name).train.iterations >= 1
    assert yaml.safe_load(out.read_text()) == compose(_base(), yaml.safe_load(config.read_text()))
    assert f"iln config configs/{config.name}" in config.read_text(), "say how to apply it"


def _repeats(base: dict, overlay: dict, where: str = "") -> list[str]:
    """The keys of ``overlay`` whose value is the one ``base`` already has."""
    found = []
    for key, value in overlay.items():
        dotted = f"{where}.{key}" if where else key
        if key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict) and dotted not in GRIDS:
            found += _repeats(base[key], value, dotted)
        elif value == base[key]:
            found.append(dotted)
    return found


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_an_overlay_holds_only_differences(config):
    overlay = yaml.safe_load(config.read_text())
    assert _repeats(_base(), overlay) == [], f"{config.name} repeats params.yaml's values"


def test_repeats_finds_a_value_equal_to_the_default():
    base = {"train": {"lr": 1.0, "seed": 1}, "runs": {"a": {}}}
    assert _repeats(base, {"train": {"lr": 1.0, "seed": 2}, "runs": {"a": {}}}) == [
        "train.lr",
        "runs",
    ]


def test_the_command_keeps_the_comments_of_what_the_overlay_does_not_set(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(DEFAULT.read_text())
    recipe = ROOT / "configs/cpu_paper_recipe.yaml"
    assert main(["config", str(recipe), "--params", str(params)]) == 0
    assert "git checkout" in capsys.readouterr().out
    text = params.read_text()
    assert applied(text) == [recipe.as_posix()]
    assert f"git checkout {params.as_posix()}" in text.splitlines()[2]
    kept = [line for line in DEFAULT.read_text().splitlines() if line.startswith(("data:", "  "))]
    changed = [line for line in kept if line.lstrip().startswith(("lr:", "ema_decay:"))]
    assert len(changed) == 2
    for line in kept:
        assert (line in text) != (line in changed), line
    assert load_params(params).train.lr == 2.0e-4


def test_a_section_that_does_not_split_cleanly_is_rewritten_whole():
    base = "a: &shared {k: 1}\nb: *shared\n"  # the alias would lose its anchor
    text = render(base, {"a": {"k": 2}}, names=["o.yaml"], notes="", back="p.yaml")
    assert yaml.safe_load(text) == {"a": {"k": 2}, "b": {"k": 1}}
    assert "Every section is rewritten" in text


BAD = [
    ("train: {batchsize: 8}\n", "train.batchsize: unknown key"),
    ("train: {lr: 2e-4}\n", "train.lr: expected a number"),
    ("runs: {x: {arch: hat_tiny, norm: groupnorm, task: sr_x2, groups: []}}\n", "runs.x.norm"),
    ("degrade: {tasks: [dn_s25]}\n", "runs.ln.task: 'sr_x2' is not produced"),
    ("train:\n  lr: 1.0\n  lr: 2.0\n", "train.lr: duplicate key"),
    ("[train, lr]\n", "expected a mapping of params.yaml sections"),
    ("train: [\n", "not valid YAML"),
    (None, "no such overlay file"),
]


@pytest.mark.parametrize("overlay, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_overlay_is_refused_naming_file_and_key_and_params_stay_byte_identical(
    tmp_path, capsys, overlay, message
):
    params = tmp_path / "params.yaml"
    params.write_bytes(DEFAULT.read_bytes())
    bad = tmp_path / "bad_overlay.yaml"
    if overlay is not None:
        bad.write_text(overlay)
    assert main(["config", str(bad), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iln config: error: ") and err.count("\n") == 1, err
    assert "bad_overlay.yaml" in err and message in err, err
    assert params.read_bytes() == DEFAULT.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {bad.name, "params.yaml"} if overlay is not None else {"params.yaml"}
    )


def test_a_second_overlay_is_refused_unless_stacked(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(DEFAULT.read_text())
    first, second = ROOT / "configs/cpu_paper_recipe.yaml", ROOT / "configs/cpu_realsr.yaml"
    assert main(["config", str(first), "--params", str(params)]) == 0
    once = params.read_bytes()
    assert main(["config", str(second), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "already composed from" in err and "--stack" in err and err.count("\n") == 1
    assert params.read_bytes() == once
    assert main(["config", str(second), "--params", str(params), "--stack"]) == 0
    assert applied(params.read_text()) == [first.as_posix(), second.as_posix()]
    loaded = load_params(params)
    assert (loaded.train.lr, list(loaded.runs)) == (2.0e-4, ["realsr_ln", "realsr_iln"])


def test_a_bad_base_is_named_as_such(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(DEFAULT.read_text().replace("iterations: 600", "iterations: -1"))
    assert main(["config", str(ROOT / "configs/cpu_tasks.yaml"), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"{params}: train.iterations" in err and "cpu_tasks" not in err


def test_the_command_runs_as_a_subprocess(tmp_path):
    (tmp_path / "params.yaml").write_text(DEFAULT.read_text())
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "PYTHONPATH": str(ROOT / "src"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "iln", "config", str(ROOT / "configs/cpu_tasks.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "iln config: wrote params.yaml" in done.stdout
    text = (tmp_path / "params.yaml").read_text()
    assert text.startswith(MARKER) and "tracking:" in text
    assert load_params(tmp_path / "params.yaml").tracking.experiment == "iln-cpu-tasks"
