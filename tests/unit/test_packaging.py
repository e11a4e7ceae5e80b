"""The package as a wheel: everything read at run time ships inside it and is found from there.

A checkout (or an editable install) can read files next to the package; a wheel installs only what
pyproject.toml declares. These tests build the wheel from a copy of the sources, install it into a
folder with no checkout around, and use it from there. ``.ci/run`` goes further (a clean venv,
every recipe, the console script: ``.ci/wheel_smoke.py``).
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"recipes": "*.yaml", "models": "*.yaml", "parallel": "*.yaml", "deepspeed": "*.json"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of pyproject.toml, README.md and dist_spectral/ (the checkout is
    left alone: an in-tree build writes build/ and *.egg-info), with the venv's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dist_spectral", src / "dist_spectral", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", str(src), "-w", str(tmp / "dist")], capture_output=True, text=True)
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout}\n{out.stderr}"
    (path,) = (tmp / "dist").glob("dist_spectral-*.whl")
    return path


def test_wheel_holds_every_runtime_config_and_the_typing_marker(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind, pattern in KINDS.items():
        files = sorted((ROOT / "dist_spectral" / "configs" / kind).glob(pattern))
        assert files, f"dist_spectral/configs/{kind} has no {pattern}"
        missing = [f.name for f in files if f"dist_spectral/configs/{kind}/{f.name}" not in names]
        assert not missing, f"not in the wheel: configs/{kind}/{missing}"
    assert "dist_spectral/py.typed" in names
    assert not [n for n in names if n.startswith("configs/")], "a top-level configs/ would land in site-packages"


def test_installed_wheel_builds_an_optimizer_away_from_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, f"pip install failed:\n{out.stdout}\n{out.stderr}"
    script = (
        "import dist_spectral, torch\n"
        "from dist_spectral.models import build_model\n"
        "from dist_spectral.training.config import load_config\n"
        "from dist_spectral.training.launchers import deepspeed_json\n"
        "print(dist_spectral.__file__)\n"
        "model = build_model('tiny-olmoe', seed=0)\n"
        "opt = dist_spectral.build_optimizer(model)\n"
        "print(sorted(g['name'] for g in opt.param_groups))\n"
        "print(load_config(None, ['parallel=hsdp']).parallel.engine, deepspeed_json('zero2')['zero_optimization']['stage'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DIST_SPECTRAL_CONFIG_DIR"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    where, groups, layout = out.stdout.splitlines()[-3:]
    assert Path(where).resolve().is_relative_to(target.resolve()), f"imported from {where}, not the wheel"
    assert {"attention", "router", "mlp", "embedding"} <= set(ast.literal_eval(groups))
    assert layout == "hsdp 2"
