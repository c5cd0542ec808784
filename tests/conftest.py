"""Shared test fixtures: every op test runs on each backend that exists here.

* ``cpu``            the C++ CPU kernels
* ``cuda-emulated``  the CUDA kernel sources run on the CPU by the SIMT emulator (marked ``emulated``,
                     so CI can rerun just these under another schedule: ``-m emulated``)
* ``cuda``           the CUDA kernels on a GPU, when one is present (marked ``cuda``)
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import fusedops


def pytest_configure(config):
    config.addinivalue_line("markers", "emulated: runs CUDA kernel sources on the SIMT emulator")
    config.addinivalue_line("markers", "cuda: needs a GPU")
    # Every output an op allocates starts as NaN / all-ones, so an element a kernel never writes fails
    # the comparison with the reference instead of passing on leftover zeros.
    fusedops._C.set_poison_outputs(True)


def pytest_report_header(config):
    info = fusedops.build_info()
    return [
        f"fusedops: torch {info['torch_version']}, backends {info['backends']}, cpu isa {info['cpu_isa']} "
        f"(available {info['cpu_isas_available']}), emulator schedule {info['emulator_schedule']}, "
        f"threads {info['threads']}"
    ]


def backend_params(cpu: bool = True, emulated: bool = True, cuda: bool = True):
    """pytest params for the backends available here."""
    params = []
    if cpu:
        params.append(pytest.param("cpu", id="cpu"))
    if emulated:
        params.append(pytest.param("cuda-emulated", id="emu", marks=pytest.mark.emulated))
    if cuda and "cuda" in fusedops.available_backends():
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return params


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


@pytest.fixture(params=backend_params())
def backend(request):
    """Each backend in turn, selected for the duration of the test."""
    with fusedops.backend(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    return device_for(backend)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed, per-test seed: reruns draw the same inputs, different tests draw different ones."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    if os.environ.get("FUSEDOPS_TEST_SEED"):
        seed ^= int(os.environ["FUSEDOPS_TEST_SEED"])
    torch.manual_seed(seed)
    yield seed
