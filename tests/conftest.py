"""Suite-wide checks.

The suite runs whole or not at all: a missing test dependency (DeepSpeed, transformers, Triton for
the interpreter-run kernel tests, ...) would otherwise turn dozens of tests into quiet skips, and a
green run would prove nothing about them. Only the CUDA tests skip, on machines without a GPU.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

#: Importable names of everything README command 1 installs for the tests (extras ``dev`` and ``deepspeed``).
TEST_DEPENDENCIES = ("transformers", "accelerate", "deepspeed", "triton", "hypothesis", "matplotlib", "expecttest")

#: Set to 1 to run what the installed packages allow, skipping the rest (not what CI does).
ALLOW_MISSING = "DIST_SPECTRAL_ALLOW_MISSING_TEST_DEPS"


def missing_test_dependencies() -> list[str]:
    return [name for name in TEST_DEPENDENCIES if importlib.util.find_spec(name) is None]


def pytest_configure(config):
    missing = missing_test_dependencies()
    if missing and os.environ.get(ALLOW_MISSING) != "1":
        raise pytest.UsageError(
            f"test dependencies not installed: {', '.join(missing)}. Install everything the tests need with "
            "README command 1 (DS_BUILD_OPS=0 pip install -c constraints.txt -e \".[dev,deepspeed]\"), or set "
            f"{ALLOW_MISSING}=1 to skip the tests that need them")
