"""The engine boundary: the optimizer reaches an engine only through the Engine protocol, an
adapter that lacks part of it fails before any collective, and the simulator needs no optimizer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_spectral
from dist_spectral import SpectralOptimizer, StepStats, build_optimizer
from dist_spectral.engines import PROTOCOL_METHODS, Collectives, Engine, EngineAdapter
from dist_spectral.engines.single import ReplicatedEngine
from tests.tiny import synthetic_grad, tiny_qwen3


class _Delegating(EngineAdapter):
    """An adapter by composition: every protocol method forwards to a replicated adapter."""

    def __init__(self, skip: str | None = None):
        self.inner = ReplicatedEngine()
        self.collectives = self.inner.collectives
        self.step_item_calls = 0

    def layout(self, param):
        return self.inner.layout(param)

    def local(self, tensor):
        return self.inner.local(tensor)

    def bind_groups(self, param_groups):
        self.inner.bind_groups(param_groups)

    def init_state(self, param_groups, infos, state):
        self.inner.init_state(param_groups, infos, state)

    def step_items(self, param_groups, infos, state):
        self.step_item_calls += 1
        return self.inner.step_items(param_groups, infos, state)

    def row_view(self, layout, flat):
        return self.inner.row_view(layout, flat)


def _without(method: str) -> type:
    """A subclass of :class:`_Delegating`'s shape that forgets ``method``."""
    body = {m: getattr(_Delegating, m) for m in PROTOCOL_METHODS if m != method}
    body["__init__"] = _Delegating.__init__
    return type(f"Without_{method}", (EngineAdapter,), body)


def test_protocol_methods_are_the_abstract_ones():
    members = {m for m in vars(Engine) if not m.startswith("_")} - {"collectives"}
    assert set(PROTOCOL_METHODS) == members == set(EngineAdapter.__abstractmethods__)
    assert isinstance(_Delegating(), Engine)


@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_adapter_missing_a_method_cannot_be_instantiated(method):
    with pytest.raises(TypeError, match=method):
        _without(method)()


@pytest.mark.parametrize("method", PROTOCOL_METHODS)
def test_duck_typed_adapter_missing_a_method_is_refused_before_any_state(method):
    class Duck:
        collectives = Collectives()

    for m in PROTOCOL_METHODS:
        if m != method:
            setattr(Duck, m, getattr(_Delegating, m))
    model = tiny_qwen3(seed=0)
    groups = [{"params": list(model.named_parameters()), "rule": "adamw", "lr": 1e-3}]
    infos = {i.name: i for i in dist_spectral.classify(model)}
    with pytest.raises(TypeError, match=rf"Duck lacks {method}: implement the dist_spectral.engines.Engine protocol"):
        SpectralOptimizer(groups, infos, topology=Duck())


def test_optimizer_steps_only_through_the_adapter():
    """A composed adapter gives the default adapter's step bit for bit, one step_items call per step."""
    results = []
    for adapter in (None, _Delegating()):
        model = tiny_qwen3(seed=0)
        opt = build_optimizer(model, "symmetric")
        if adapter is not None:
            opt.attach(adapter)
        for step in (1, 2):
            for name, p in model.named_parameters():
                p.grad = synthetic_grad(name, p.shape, step)
            opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert adapter.step_item_calls == 2
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_stats_add_sums_every_counter():
    a = StepStats({"gather": 4, "colsum": 8}, {"gather": 2}, 1, 10, 3, 0.5, 0.25, 1.0, False, 0.125)
    b = StepStats({"gather": 1, "scatter": 2}, {"scatter": 6}, 2, 5, 1, 0.25, 0.5, 2.0, True, 0.25)
    assert a.add(b) is a
    assert a == StepStats({"gather": 5, "colsum": 8, "scatter": 2}, {"gather": 2, "scatter": 6}, 3, 15, 4, 0.75,
                          0.75, 3.0, True, 0.375)


def test_planner_does_not_import_the_optimizer():
    """The simulator is importable without the optimizer (the package's own __init__ bypassed)."""
    package = Path(dist_spectral.__file__).parent
    code = (
        "import importlib, sys, types\n"
        "pkg = types.ModuleType('dist_spectral')\n"
        f"pkg.__path__ = [{str(package)!r}]\n"
        "sys.modules['dist_spectral'] = pkg\n"
        "importlib.import_module('dist_spectral.planner')\n"
        "print(sorted(m for m in sys.modules if m.startswith('dist_spectral.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert "dist_spectral.planner" in loaded
    assert "dist_spectral.optimizer" not in loaded and "dist_spectral.exchange" not in loaded, loaded
