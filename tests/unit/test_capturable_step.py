"""A step that reads nothing back from the device, and momentum in foreach operations per group.

With ``nonfinite="off"`` a step after the first must not synchronise the host with the device (what
a CUDA graph capture forbids and what stalls a GPU run): no ``.item()``, ``.tolist()``, ``.cpu()``,
``bool(tensor)`` and no ``aten._local_scalar_dense`` (the op every such read dispatches). There is
no GPU here, so the test patches those reads to raise and counts the op, on CPU. The batched
direction inputs must be the per-parameter ones bit for bit.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_spectral import build_optimizer
from dist_spectral.rules import Rule, get_rule
from tests.tiny import synthetic_grad, tiny_olmoe


class _HostSync(RuntimeError):
    pass


class _CountScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: a tensor's value read by the host."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _forbid_reads(monkeypatch):
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        def refuse(self, *args, _name=name, **kwargs):
            raise _HostSync(f"Tensor.{_name} in step()")
        monkeypatch.setattr(torch.Tensor, name, refuse)


def _build(recipe: str, nonfinite: str):
    model = tiny_olmoe(experts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, build_optimizer(model, recipe, nonfinite=nonfinite)


def _grads(model, step: int) -> None:
    for n, p in model.named_parameters():
        p.grad = synthetic_grad(n, p.shape, step)


@pytest.mark.parametrize("recipe", ["muon", "symmetric", "adamw"])
def test_off_steps_without_host_reads(recipe, monkeypatch):
    """Three steps under ``nonfinite="off"``, the last two with every host read refused: the
    weights equal those of the same steps under ``"skip"`` (finite gradients), bit for bit. The
    same patch makes a ``"skip"`` step fail, so it does catch the one read that policy needs."""
    model, opt = _build(recipe, "off")
    ref_model, ref_opt = _build(recipe, "skip")
    _grads(model, 0), _grads(ref_model, 0)
    opt.step(), ref_opt.step()  # the first step checks the model and reads the counters once
    for step in (1, 2):
        _grads(model, step), _grads(ref_model, step)
        with monkeypatch.context() as m, _CountScalarReads() as reads:
            _forbid_reads(m)
            opt.step()
        assert reads.reads == 0
        ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
    assert opt.num_steps == ref_opt.num_steps == 3
    _grads(ref_model, 3)
    with monkeypatch.context() as m, pytest.raises(_HostSync):
        _forbid_reads(m)
        ref_opt.step()


def _tensor_lrs(opt) -> None:
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))


@pytest.mark.parametrize("recipe", ["muon", "symmetric", "adamw"])
def test_tensor_lr_follows_its_scheduler_without_host_reads(recipe, monkeypatch):
    """0-d tensor lrs (what a CUDA graph needs, as torch's capturable optimizers take them): a
    ``LambdaLR`` fills them in place between steps, the steps read nothing back, and the weights
    follow the Python-number lrs' run to rounding (lr in fp32 and the update no longer fused with
    it: measured 1.2e-7 of each tensor's largest entry after 4 steps)."""
    runs = []
    for tensor_lr in (False, True):
        model, opt = _build(recipe, "off")
        if tensor_lr:
            _tensor_lrs(opt)
        runs.append((model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))))
    (ref_model, ref_opt, ref_sched), (model, opt, sched) = runs
    lr_tensors = [g["lr"] for g in opt.param_groups]
    assert any(g["weight_decay"] for g in opt.param_groups)  # the decay's tensor path runs too
    for step in range(4):
        _grads(model, step), _grads(ref_model, step)
        ref_opt.step()
        if step == 0:
            opt.step()  # the first step checks the model and reads the counters once
        else:
            with monkeypatch.context() as m, _CountScalarReads() as reads:
                _forbid_reads(m)
                opt.step()
            assert reads.reads == 0
        sched.step(), ref_sched.step()
    assert [g["lr"] for g in opt.param_groups] == lr_tensors  # filled in place, not replaced
    for g, ref in zip(opt.param_groups, ref_opt.param_groups):
        assert g["lr"].item() == pytest.approx(ref["lr"], rel=1e-7)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=4e-7 * float(q.detach().abs().max()), msg=n)


def test_off_lets_a_nan_through_and_skip_does_not():
    model, opt = _build("muon", "off")
    _grads(model, 0)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert not opt.last_stats.skipped and not torch.isfinite(next(model.parameters())).all()


def test_step_counter_written_in_place_is_read_again():
    """The host copy of a step counter follows a write into its tensor (a checkpoint loaded in
    place): AdamW's bias correction then uses the written value, as after ``load_state_dict``."""
    runs = [_build("adamw", "skip") for _ in range(3)]
    for model, opt in runs:
        _grads(model, 0)
        opt.step()
    (_, in_place), (_, loaded), _ = runs
    for state in in_place.state.values():
        state["step"].fill_(10)
    sd = loaded.state_dict()
    for state in sd["state"].values():
        state["step"] = torch.tensor(10.0)
    loaded.load_state_dict(sd)
    for model, opt in runs:
        _grads(model, 1)
        opt.step()
    (a, _), (b, _), (c, _) = runs
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert all(float(s["step"]) == 11 for s in in_place.state.values())


def _states(rule: Rule, shapes, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = torch.zeros(shape)
        state = rule.init_state(p, dict(rule.defaults))
        for t in state.values():
            t.copy_(torch.rand(shape, generator=gen))  # positive: a valid exp_avg_sq
        out.append(state)
    return out


@pytest.mark.parametrize("rule_name,options", [("adamw", {}), ("muon", {}), ("muon", {"nesterov": False}),
                                               ("row_norm", {}), ("left_spectral", {})])
def test_batched_direction_inputs_equal_per_parameter(rule_name, options):
    rule = get_rule(rule_name)
    group = {**rule.defaults, **options, "lr": 0.01, "weight_decay": 0.0}
    shapes = [(5, 7), (3, 4, 6), (11,), (0, 3)]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    steps = [3, 3, 1, 7]
    batched, single = _states(rule, shapes, 2), _states(rule, shapes, 2)
    got = rule.direction_inputs(batched, grads, group, steps)
    want = [rule.direction_input(s, g, group, step=t) for s, g, t in zip(single, grads, steps)]
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    for s, r in zip(batched, single):
        assert all(torch.equal(s[k], r[k]) for k in s)


def test_rule_overriding_direction_input_only_gets_a_loop():
    """A neighbour rule that defines only ``direction_input`` keeps its own momentum."""

    class Doubling(Rule):
        name = "doubling"

        def direction_input(self, local_state, grad, group, *, step):
            return grad * 2 + step

    got = Doubling().direction_inputs([{}, {}], [torch.ones(2), torch.zeros(3)], {}, [1, 4])
    assert torch.equal(got[0], torch.full((2,), 3.0)) and torch.equal(got[1], torch.full((3,), 4.0))


class _CountingEnviron(dict):
    def __init__(self, base):
        super().__init__(base)
        self.reads = 0

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)


def test_kernel_variables_are_read_at_build_not_per_product(monkeypatch):
    """``DIST_SPECTRAL_TRITON`` decides the backend as read when the optimizer was built; a polar
    call reads no environment variable (it used to read two per product, ten per 5-step polar)."""
    from dist_spectral.functional import polar
    from dist_spectral.kernels import resolve, triton_gram

    env = _CountingEnviron(triton_gram.os.environ)
    env["DIST_SPECTRAL_TRITON"] = "1"
    monkeypatch.setattr(triton_gram.os, "environ", env)
    try:
        _build("muon", "skip")
        assert resolve("auto", torch.device("cpu")) == "triton"
        env["DIST_SPECTRAL_TRITON"] = "0"
        assert resolve("auto", torch.device("cpu")) == "triton"  # not read again until a build or a reload
        _build("muon", "skip")
        assert resolve("auto", torch.device("cpu")) == "torch"
        reads = env.reads
        polar(torch.randn(4, 8, 16), steps=5)
        assert env.reads == reads
    finally:
        monkeypatch.undo()
        triton_gram.reload_environment()  # the real environment for the tests that follow


@pytest.mark.parametrize("shape", [(3000, 16, 16), (6, 40, 24)])
def test_polar_works_in_its_own_copy(shape):
    """polar divides and iterates in place in its own copy (its chunks go back into it): the input,
    contiguous or a strided view, is untouched, and chunked equals one matrix at a time."""
    from dist_spectral.functional import polar

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for view in (x, x.mT, x[:, ::2]):
        before = view.clone()
        out = polar(view)
        assert torch.equal(view, before)
        assert torch.equal(out[-1], polar(view[-1]))


def test_a_tensor_lr_that_is_not_0d_is_refused_before_anything_changes():
    """A ``[1]``-shaped lr passes a numel check but not the update's foreach operations: refused at
    construction, and at a step (a scheduler or the user may set it later) before any weight, state
    or counter moves."""
    model = tiny_olmoe(experts=3)
    with pytest.raises(ValueError, match=r"group .embedding.*lr=tensor\(\[0.0100\]\): a tensor lr must be 0-d"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_optimizer(model, "muon", lr=torch.tensor([0.01]))
    model, opt = _build("muon", "skip")
    _grads(model, 0)
    opt.step()
    _grads(model, 1)
    opt.param_groups[-1]["lr"] = torch.tensor([0.01])  # the last group: earlier ones would be applied first
    before = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=r"param group .vector.: lr=tensor\(\[0.0100\]\).*Nothing was updated"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(torch.equal(v, opt.state[p][k]) for p in opt.state for k, v in state[id(p)].items())
    assert opt.num_steps == 1
