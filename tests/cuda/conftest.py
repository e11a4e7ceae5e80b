"""CUDA tests: skipped without a GPU; measured errors appended to ``$DIST_SPECTRAL_CUDA_RECORD``.

The bounds in these tests were estimated before any run on a GPU (each test says how); the
record (one JSON object per line: test, quantity, measured value, bound) is what tightens them.
"""
from __future__ import annotations

import json
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false); run on a GPU machine, "
                                   "e.g. benchmarks/gpu/run.sh")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture
def record(request):
    """``record(quantity, value, bound)``: append one measurement to ``$DIST_SPECTRAL_CUDA_RECORD``."""
    path = os.environ.get("DIST_SPECTRAL_CUDA_RECORD")

    def write(quantity: str, value: float, bound: float | None = None) -> None:
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.name, "quantity": quantity, "value": float(value),
                                    "bound": bound}) + "\n")

    return write


@pytest.fixture
def fresh_choices():
    """No kernel choice table installed before or after the test."""
    from dist_spectral.kernels import choice

    choice.clear()
    yield choice
    choice.clear()
