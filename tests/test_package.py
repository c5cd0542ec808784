"""The package itself: what build_info reports, the import-time torch check, backend selection."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import fusedops
from fusedops import _backend, _loader


def test_build_info_describes_this_build():
    info = fusedops.build_info()
    assert info["torch_version"] == torch.__version__ == info["built_against_torch"]
    assert {"cpu", "cuda-emulated"} <= set(info["backends"])
    assert info["cpu_isa"] in info["cpu_isas_available"]
    assert set(info["cpu_isas_available"]) <= set(info["cpu_isas_built"]) | {"base"}
    assert ("cuda" in info["backends"]) == (info["cuda_built"] and torch.cuda.is_available())
    if info["cuda_built"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"


def test_import_against_another_torch_says_how_to_rebuild(monkeypatch):
    fake = types.ModuleType("fusedops._build_config")
    fake.TORCH_VERSION = "1.0.0-not-this-one"
    monkeypatch.setitem(sys.modules, "fusedops._build_config", fake)
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0-not-this-one.*pip install --no-build-isolation"):
        _loader.load_extension()


def test_missing_build_says_how_to_build(monkeypatch):
    real_import = importlib.import_module

    def no_config(name, *args):
        if name == "fusedops._build_config":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_config)
    with pytest.raises(ImportError, match="not built"):
        _loader.load_extension()


def test_backend_context_selects_and_restores():
    assert fusedops.current_backend() == "auto"
    with fusedops.backend("cuda-emulated"):
        assert fusedops.current_backend() == "cuda-emulated"
        assert _backend.resolve("op", torch.device("cpu")) == _backend.EMULATED
        with fusedops.backend("cpu"):
            assert _backend.resolve("op", torch.device("cpu")) == _backend.CPU
        assert fusedops.current_backend() == "cuda-emulated"
    assert fusedops.current_backend() == "auto"
    assert _backend.resolve("op", torch.device("cpu")) == _backend.CPU


def test_backend_errors_name_the_problem():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fusedops.backend("tpu"):
            pass
    with fusedops.backend("cuda"):
        with pytest.raises((ValueError, RuntimeError), match="CUDA tensors|not built"):
            _backend.resolve("my_op", torch.device("cpu"))
    with pytest.raises(ValueError, match="meta"):
        _backend.resolve("my_op", torch.device("meta"))


def test_cpu_isa_selection():
    available = fusedops.build_info()["cpu_isas_available"]
    before = fusedops._C.cpu_isa()
    try:
        for isa in available:
            fusedops.set_cpu_isa(isa)
            assert fusedops._C.cpu_isa() == isa
        with pytest.raises(ValueError, match="unknown CPU ISA"):
            fusedops.set_cpu_isa("sse9")
    finally:
        fusedops.set_cpu_isa(before)
