"""params.yaml: the shipped files load, and bad params fail early, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iln.config.params import ParamsError, load_params, resolve_run
from iln.config.overlay import apply_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def _shipped(path: Path, tmp_path: Path) -> Path:
    """params.yaml itself, or a configs/ overlay composed onto it (as `iln config` does)."""
    if path.parent.name != "configs":
        return path
    apply_file(path, ROOT / "params.yaml", tmp_path / "composed" / "params.yaml")
    return tmp_path / "composed" / "params.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_params_files_load(path, tmp_path):
    params = load_params(_shipped(path, tmp_path))
    for name in params.runs:
        run = resolve_run(params, name)
        assert run.train.iterations >= 1


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _first_run(raw):
    return raw["runs"][next(iter(raw["runs"]))]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda r: _first_run(r).update(norm="groupnorm"),
            r"runs\.\w+\.norm: unknown norm 'groupnorm'",
        ),
        (lambda r: _first_run(r).update(arch="hat_9"), r"runs\.\w+\.arch: unknown arch 'hat_9'"),
        (
            lambda r: _first_run(r).update(task="sr_x5"),
            r"runs\.\w+\.task: SR scale must be one of .*'sr_x5'",
        ),
        (lambda r: _first_run(r).update(task="dn_x15"), r"runs\.\w+\.task: unknown task 'dn_x15'"),
        (
            lambda r: _first_run(r).update(task="dn_s15"),
            r"runs\.\w+\.task: 'dn_s15' is not produced by the degrade stage",
        ),
        (
            lambda r: (
                r["degrade"].update(tasks=["sr_x2", "dn_s15"]),
                r["train"].update(train_set="DF2K"),
                _first_run(r).update(task="dn_s15"),
            ),
            r"train\.train_set: dn_s15 trains on the clean images of 'DF2K'.*DIV2K_train, Flickr2K",
        ),
        (
            lambda r: _first_run(r).update(train_set="DIV2K_train"),
            r"runs\.\w+\.train_set: sr_x2 trains on the degrade stage's pairs of 'DIV2K_train'",
        ),
        (
            lambda r: r["evaluate"].update(sets=["Set5"]),
            r"evaluate\.sets: 'Set5' is not a set the degrade stage makes for any task",
        ),
        (
            lambda r: r["train"].update(lr="2e-4"),
            r"train\.lr: expected a number, got the string '2e-4'.*2\.0e-04",
        ),
        (lambda r: r["train"].pop("ema_decay"), r"train\.ema_decay: missing required key"),
        (lambda r: r["train"].update(batchsize=4), r"train\.batchsize: unknown key"),
        (
            lambda r: _first_run(r).update(iterations="many"),
            r"runs\.\w+\.iterations: expected an integer",
        ),
        (
            lambda r: _first_run(r).update(groups=["table99"]),
            r"runs\.\w+\.groups: unknown group 'table99'",
        ),
        (
            lambda r: _first_run(r).update(model={"in_chans": 1}),
            r"runs\.\w+\.model\.in_chans: grey models are evaluated .* not trained here yet",
        ),
        (lambda r: r["train"].update(amp="fp8"), r"train\.amp: expected one of"),
        (lambda r: r["train"].update(milestones=[10, 5]), r"train\.milestones: must be increasing"),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, message):
    with pytest.raises(ParamsError, match=message) as info:
        load_params(_write(tmp_path, mutate))
    assert "params.yaml" in str(info.value)


def test_unknown_model_override_is_rejected_when_the_model_is_built(tmp_path):
    from iln.models import build_model

    with pytest.raises(ValueError, match="embed_dimm"):
        build_model("hat_tiny", norm="ln", scale=2, embed_dimm=8)


def test_run_overrides_take_precedence_over_train_defaults(tmp_path):
    path = _write(tmp_path, lambda r: _first_run(r).update(iterations=7, grad_clip=0.5))
    params = load_params(path)
    run = resolve_run(params, next(iter(params.runs)))
    assert (run.train.iterations, run.train.grad_clip) == (7, 0.5)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_params_survive_a_yaml_1_2_rewrite(tmp_path, path):
    """`dvc exp run -S` rewrites params.yaml with a YAML 1.2 dumper, dropping quotes that
    YAML 1.1 (our reader) needs, e.g. around 4:2:0 (base-60 int) or off (boolean)."""
    from ruamel.yaml import YAML

    path = _shipped(path, tmp_path)
    writer = YAML(typ="safe", pure=True)
    rewritten = tmp_path / "rewritten.yaml"
    with rewritten.open("w") as handle:
        writer.dump(writer.load(path), handle)
    assert load_params(rewritten) == load_params(path)
