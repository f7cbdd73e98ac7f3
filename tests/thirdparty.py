"""The authors' HAT_iLN and traiNNer-redux's hat_iln, loaded at test time from checkouts the
user names (``ILN_OFFICIAL_REPO``: the authors' i-LN repository; ``ILN_REDUX_REPO``:
traiNNer-redux), for the tests that compare our exports with their code. Only the
architecture files are executed: the packages around them (BasicSR's registry and arch
utilities, traiNNer's registry and downloads) are replaced by the few names those files use.
None of their code is part of this project."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch import nn

OFFICIAL_ENV = "ILN_OFFICIAL_REPO"
REDUX_ENV = "ILN_REDUX_REPO"


def repo(env: str, marker: str) -> Path:
    """The checkout ``env`` names, or skip the test saying how to give one."""
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"{env} is not set (a checkout of the code to compare with)")
    root = Path(value)
    if not (root / marker).is_file():
        pytest.skip(f"{env}={root}: no {marker} there")
    return root


class _Registry:
    def register(self, obj=None):
        return obj if obj is not None else (lambda o: o)

    def _do_register(self, name, obj):
        return None


def _to_2tuple(x):
    return x if isinstance(x, tuple) else (x, x)


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def _modules(stubs: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = old


def _package(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attrs)
    return module


def official_hat_iln() -> type[nn.Module]:
    """The authors' ``HAT_iLN`` class (needs einops)."""
    pytest.importorskip("einops")
    root = repo(OFFICIAL_ENV, "iLN/basicsr/archs/hat_iLN_arch.py") / "iLN" / "basicsr" / "archs"
    registry = _package("basicsr.utils.registry", ARCH_REGISTRY=_Registry())
    arch_util = _package(
        "basicsr.archs.arch_util", to_2tuple=_to_2tuple, trunc_normal_=nn.init.trunc_normal_
    )
    archs = _package("basicsr.archs", arch_util=arch_util)
    stubs = {
        "basicsr": _package("basicsr", archs=archs),
        "basicsr.utils": _package("basicsr.utils", registry=registry),
        "basicsr.utils.registry": registry,
        "basicsr.archs": archs,
        "basicsr.archs.arch_util": arch_util,
    }
    with _modules(stubs):
        archs.hat_arch = _load("basicsr.archs.hat_arch", root / "hat_arch.py")
        module = _load("basicsr.archs.hat_iLN_arch", root / "hat_iLN_arch.py")
    return module.HAT_iLN


def redux_hat_iln() -> type[nn.Module]:
    """traiNNer-redux's ``HAT_iLN`` class (needs einops and spandrel)."""
    pytest.importorskip("einops")
    pytest.importorskip("spandrel", reason="traiNNer-redux's hat_iln imports spandrel helpers")
    root = repo(REDUX_ENV, "traiNNer/archs/hat_iln_arch.py") / "traiNNer"
    registry = _package("traiNNer.utils.registry", ARCH_REGISTRY=_Registry())
    download = _package("traiNNer.utils.download_util", load_file_from_url=None)
    stubs = {
        "traiNNer": _package("traiNNer"),
        "traiNNer.utils": _package("traiNNer.utils"),
        "traiNNer.utils.registry": registry,
        "traiNNer.utils.download_util": download,
        "traiNNer.archs": _package("traiNNer.archs"),
    }
    with _modules(stubs):
        _load("traiNNer.archs.arch_util", root / "archs" / "arch_util.py")
        module = _load("traiNNer.archs.hat_iln_arch", root / "archs" / "hat_iln_arch.py")
    return module.HAT_iLN
