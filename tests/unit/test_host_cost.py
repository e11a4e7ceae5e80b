"""Host cost of a step: tensor operations per batch of one (rule key, shape), not per unit.

The exchange compiles each bucket once (batches with their views or index tensors), and the step
then runs a fixed number of operations per batch: a model with four times the experts runs the
same operations on bigger tensors. Step counters and learning rates change every step without
recompiling anything.
"""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_spectral import build_optimizer
from dist_spectral.blocks import Block, unit_specs
from dist_spectral.compute import BlockRef, ParamContext, compile_batches, read_batch, write_batch
from dist_spectral.roles import ParamInfo
from tests.tiny import synthetic_grad, tiny_olmoe


class _CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched (each is a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(experts: int, recipe: str) -> Counter:
    model = tiny_olmoe(experts=experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, recipe)
    for step in range(2):  # the second step runs what the first compiled
        for n, p in model.named_parameters():
            p.grad = synthetic_grad(n, p.shape, step)
        if step == 1:
            with _CountOps() as counter:
                opt.step()
        else:
            opt.step()
    return counter.ops


@pytest.mark.parametrize("recipe", ["muon", "aro"])
def test_operations_per_step_do_not_grow_with_units(recipe):
    """3 and 12 experts per layer (expert units 18 vs 72 per layer): the same operations, the
    same number of times. Before, each unit cost its own slices, stacks and copies (and a
    ``step.item()`` host read), so the count grew with the experts."""
    few, many = _ops_per_step(3, recipe), _ops_per_step(12, recipe)
    assert many == few


def test_step_counters_read_once_per_step_not_per_parameter():
    """Host reads of scalars (``.item()``, ``int(tensor)``: a synchronisation each on CUDA) in a
    step: the non-finite check's one, and at most one for all the step counters together; before,
    one per parameter for its counter and one per unit for its job."""
    model = tiny_olmoe(experts=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, "muon")
    for n, p in model.named_parameters():
        p.grad = synthetic_grad(n, p.shape, 0)
    with _CountOps() as counter:
        opt.step()
    # the non-finite check's one read, and at most one for all the step counters together
    assert counter.ops["aten._local_scalar_dense"] <= 2


def _trained(model, opt, steps: int, lrs=None) -> dict:
    for step in range(steps):
        for n, p in model.named_parameters():
            p.grad = synthetic_grad(n, p.shape, step)
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[step]
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_compiled_buckets_survive_schedules_and_step_counts():
    """A learning rate that changes every step and advancing step counters (Conda/ARO batch by
    step) reuse the compiled buckets; a hyperparameter of the direction's math recompiles them,
    and the result is that of an optimizer built with it."""
    model = tiny_olmoe(experts=4)
    opt = build_optimizer(model, "aro")
    _trained(model, opt, 1)
    (_, exchange), = opt._plans.values()
    compiled = exchange._compiled
    _trained(model, opt, 3, lrs=[1e-3, 2e-3, 5e-4])
    assert exchange._compiled is compiled

    a, b = tiny_olmoe(experts=4), tiny_olmoe(experts=4)
    changed, fresh = build_optimizer(a, "muon"), build_optimizer(b, "muon")
    _trained(a, changed, 1)
    (_, exchange), = changed._plans.values()
    before = exchange._compiled
    with torch.no_grad():  # b starts where a is after its first step, and runs 3 polar steps throughout
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa)
            fresh.state[pb].update({k: v.clone() for k, v in changed.state[pa].items()})
    for opt in (changed, fresh):
        for g in opt.param_groups:
            if g["rule"] == "muon":
                g["steps"] = 3
    for step in range(1, 3):
        for model, opt in ((a, changed), (b, fresh)):
            for n, p in model.named_parameters():
                p.grad = synthetic_grad(n, p.shape, step)
            opt.step()
    assert exchange._compiled is not before
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_experts_held_whole_are_one_strided_view():
    """A 3-D expert tensor ``[E, 2r, d]`` with gate/up halves, whole on the rank: all 2E blocks
    are one view (no index tensor), and reading then writing them round-trips every element."""
    E, r, d = 5, 3, 4
    info = ParamInfo(name="experts.gate_up", role="expert.gate_up", shape=(E, 2 * r, d), fused="halves")
    refs = [BlockRef(("muon",), 0, "x", s.row_start * d, s.rows, d, b) for s in unit_specs(info) for b in s.blocks]
    (batch,) = compile_batches(refs, torch.device("cpu"))
    assert len(batch.reads) == 1 and batch.reads[0].index is None and batch.size == 2 * E
    x = torch.randn(1, E * 2 * r * d)
    stack = read_batch(batch, {"x": x})
    assert torch.equal(stack[0], x.view(2 * E, r, d))
    out = torch.zeros_like(x)
    write_batch(batch, {"x": out}, stack)
    assert torch.equal(out, x)


def test_unevenly_spaced_and_row_run_blocks_gather_by_index():
    """Blocks of one source not evenly spaced, and blocks with several row runs (a grouped qkv),
    are read by an index tensor: the same values as read_block, written back to their places."""
    from dist_spectral.blocks import read_block

    rows, cols = 6, 5
    x = torch.randn(2, 4 * rows * cols)  # two channels
    plain = Block(1, 3, 1, 5, 2)  # rows 1, 2; columns 1, 3
    runs = Block(0, 1, 0, cols, 1, 3, 2)  # rows 0 and 3
    refs = [BlockRef(("k", b.shape), 0, "x", off, rows, cols, b) for off in (0, 30, 90) for b in (plain, runs)]
    batches = compile_batches(refs, torch.device("cpu"))
    assert [b.size for b in batches] == [3, 3] and all(r.index is not None for b in batches for r in b.reads)
    out = torch.zeros_like(x)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for batch, block in zip(batches, (plain, runs)):
        stack = read_batch(batch, {"x": x})
        expect = [read_block(x[:, off:off + rows * cols].view(2, rows, cols), block) for off in (0, 30, 90)]
        assert torch.equal(stack, torch.stack(expect, dim=1))
        write_batch(batch, {"x": out}, stack)
        write_batch(batch, {"x": mask}, torch.ones_like(stack, dtype=torch.bool))
    assert torch.equal(out[mask], x[mask]) and int(mask.sum()) == 2 * 3 * (2 * 2 + 2 * 5)


def _wire_runs(experts: int, recipe: str, world: int = 2) -> list[tuple[int, int]]:
    """Per rank, (wire runs sent, received) of the scatter of a DDP-like plan at ``world`` ranks,
    compiled without processes (the exchange compiles from the plan and its rank alone)."""
    from dist_spectral.blocks import permuted_axis
    from dist_spectral.exchange import Exchange
    from dist_spectral.layout import replicated
    from dist_spectral.plan import build_plan
    from dist_spectral.route import plan_param
    from dist_spectral.rules import get_rule

    model = tiny_olmoe(experts=experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, recipe)
    entries = [e for e in opt._entries(only_with_grad=False) if get_rule(e.group["rule"]).locality == "matrix"]
    params = [plan_param(pos, e.name, e.info, e.group, replicated(tuple(e.param.shape), world))
              for pos, e in enumerate(entries)]
    plan = build_plan(params, world)
    out = []
    for rank in range(world):
        exchange = Exchange(plan, rank)
        inputs = {pos: torch.zeros(p.channels[0], e.param.numel()) for pos, (p, e) in enumerate(zip(params, entries))}
        contexts = {pos: ParamContext(get_rule(e.group["rule"]), e.group, permuted_axis(e.info), e.info.transposed, 1)
                    for pos, e in enumerate(entries)}
        progs = exchange._program(inputs, contexts)
        out.append((sum(len(p.scatter_send) for p in progs), sum(len(p.scatter_recv) for p in progs)))
    return out


@pytest.mark.parametrize("recipe", ["muon", "aro"])
def test_wire_packing_does_not_grow_with_units(recipe):
    """At W = 2 with every parameter whole on both ranks (DDP), each rank computes every second
    expert and sends it to the other: the experts an owner computes of one parameter are evenly
    spaced, so they pack as one strided view, not one slice each (before: 2 slices per expert
    unit). 4 and 16 experts per layer pack in the same number of runs."""
    few, many = _wire_runs(4, recipe), _wire_runs(16, recipe)
    assert few == many
    assert all(sent < 16 and received < 16 for sent, received in many)  # 2 layers, ~6 matrices each


def test_strided_runs_pack_and_unpack_as_piece_by_piece():
    """Pieces of several sources, channel counts, sizes and spacings: the runs' packed payload is
    the pieces' channel slices back to back in wire order, and unpacking writes each back."""
    from dist_spectral.exchange import _strided_runs

    gen = torch.Generator().manual_seed(0)
    sources = {"a": torch.randn(1, 200, generator=gen), "b": torch.randn(3, 90, generator=gen)}
    pieces = ([["a", o, 5, 1] for o in (0, 5, 10, 40, 60, 80, 100, 103)]  # adjacent, evenly spaced, irregular
              + [["b", o, 4, 3] for o in (0, 10, 20, 30, 31, 60)] + [["a", 150, 7, 1], ["b", 80, 2, 3]])
    expect = torch.cat([sources[s][:, o:o + n].reshape(-1) for s, o, n, _ in pieces])
    runs = _strided_runs([list(p) for p in pieces])
    assert len(runs) < len(pieces)
    packed = torch.cat([r.view(sources[r.source]).reshape(-1) for r in runs])
    assert torch.equal(packed, expect)
    dests = {k: torch.zeros_like(v) for k, v in sources.items()}
    at = 0
    for r in runs:
        r.view(dests[r.source]).copy_(packed[at:at + r.wire_numel].view(r.count, r.channels, r.numel))
        at += r.wire_numel
    for s, o, n, _ in pieces:
        assert torch.equal(dests[s][:, o:o + n], sources[s][:, o:o + n])
