"""Loads fusedops._C after checking that it was built for the torch that is installed."""
from __future__ import annotations

import importlib

import torch

REBUILD = (
    "Rebuild fusedops against the installed torch: from the source tree, "
    "`pip install --no-build-isolation --force-reinstall --no-deps -e .` (or `make build`)."
)


def load_extension():
    try:
        cfg = importlib.import_module("fusedops._build_config")
    except ImportError:
        raise ImportError(
            "fusedops is not built (fusedops._build_config is missing). " + REBUILD
        ) from None
    if cfg.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fusedops was built against torch {cfg.TORCH_VERSION}, but torch {torch.__version__} is installed. "
            + REBUILD
        )
    try:
        return importlib.import_module("fusedops._C")
    except ImportError as e:
        raise ImportError(f"fusedops._C failed to load ({e}). " + REBUILD) from e
