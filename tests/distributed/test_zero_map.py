"""DeepSpeed ZeRO-1/2/3 flat partitions read through :mod:`dist_spectral.engines.zero_map`.

Processes are started once per world size (W = 2 and W = 3) for the whole module: each runs every
case below in one gloo process group and writes a JSON report that the tests then inspect. Every
rank, for every case, checks that

* the map tiles every flat partition (segments + padding) and every parameter exactly once,
* its own fp32 flat partitions, read through the map, equal the original parameter values exactly,
* at ``step()`` the client optimizer sees the mapped tensors, and their ``.grad`` read through the
  map equals a single-process reference gradient,
* the map it computed for *all* ranks equals the map every other rank computed (no communication).

The pure layout functions are tested without DeepSpeed (the DeepSpeed tests skip when it is not
installed). DeepSpeed JIT-compiles a shared-memory comm op in ``init_distributed`` (~1 min on 2
idle cores, needs g++); it is cached in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/dist_spectral/torch_extensions``). Cached, the module costs ~40 s of CPU (mostly the
start-up of 5 processes importing torch and DeepSpeed), ~45 s wall on 2 idle cores.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dist_spectral.engines.zero_map import (
    ZeroFlat, ZeroMap, ZeroSegment, build_zero_map, flat_buffer_partitions, flat_tensors, per_param_partitions,
)
from tests.distributed.ds_harness import leave_worker

WORKER_TIMEOUT_S = 420  # covers a cold JIT build of DeepSpeed's shm op

# ------------------------------------------------------------------------------------------ cases
CASES = [
    {"name": "zero1", "stage": 1},
    {"name": "zero2", "stage": 2},
    {"name": "zero3", "stage": 3},
    {"name": "zero1_round_robin", "stage": 1, "zero": {"round_robin_gradients": True}},
    {"name": "zero2_round_robin_aligned", "stage": 2,
     "zero": {"round_robin_gradients": True, "parameter_alignment": True}},
    {"name": "zero3_subgroups", "stage": 3, "zero": {"sub_group_size": 20, "stage3_param_persistence_threshold": 0}},
    {"name": "zero2_bf16", "stage": 2, "bf16": True},
    {"name": "zero1_bf16_fp32_accum", "stage": 1, "bf16": True, "extra": {"data_types": {"grad_accum_dtype": "fp32"}}},
    {"name": "zero3_bf16", "stage": 3, "bf16": True},
]
CASE_NAMES = [c["name"] for c in CASES]


class Tiny(nn.Module):
    """Odd sizes so that params and rows straddle partition boundaries, a 1-element param that
    leaves whole ranks as padding under ZeRO-3, and a frozen param DeepSpeed must leave out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.l1 = nn.Linear(6, 7)
        self.l2 = nn.Linear(7, 5, bias=False)
        self.l3 = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x):
        h = torch.tanh(self.l1(self.emb(x)))
        h = torch.tanh(self.l2(h))
        return (self.l3(h) * self.scale).pow(2).mean()


def _pattern(model):
    """Distinct values everywhere (exactly representable after the engine's dtype cast is compared
    against the same cast)."""
    start = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            v = torch.sin(torch.arange(start, start + p.numel(), dtype=torch.float64) * 0.731 + 0.1) * 0.5
            p.copy_(v.view_as(p))
            start += p.numel()


def _groups(model):
    mats = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and not n.startswith("emb")]
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (p.ndim != 2 or n.startswith("emb"))]
    return [{"params": [p for _, p in mats], "rule": "muon", "names": [n for n, _ in mats]},
            {"params": [p for _, p in rest], "rule": "adamw", "names": [n for n, _ in rest]}]


def _inputs(rank):
    return torch.randint(0, 11, (5,), generator=torch.Generator().manual_seed(17 + rank))


class _CheckingSGD(torch.optim.Optimizer):
    """SGD that, at each ``step()``, checks what DeepSpeed hands it against the map."""

    def __init__(self, groups, lr=0.1):
        super().__init__(groups, {"lr": lr})
        self.check = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.check is not None:
            self.check(self)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


def _supports(zero_key):
    """Whether this DeepSpeed's ``zero_optimization`` accepts ``zero_key`` (by name or alias)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = getattr(DeepSpeedZeroConfig, "model_fields", None) or getattr(DeepSpeedZeroConfig, "__fields__", {})
    return any(zero_key in (name, getattr(f, "alias", None)) for name, f in fields.items())


def _run_case(case, rank, world):
    import deepspeed

    errors, out = [], {"case": case["name"]}
    for key in case.get("zero", {}):
        if not _supports(key):
            return {"case": case["name"], "skipped": f"zero_optimization.{key} unknown to DeepSpeed {deepspeed.__version__}"}
    bf16 = case.get("bf16", False)
    torch.manual_seed(0)
    model = Tiny()
    _pattern(model)
    named = list(model.named_parameters())
    expected = {n: p.detach().clone().to(torch.bfloat16 if bf16 else torch.float32).float() for n, p in named}
    ref = Tiny()
    ref.load_state_dict(model.state_dict())
    opt = _CheckingSGD(_groups(model))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": case["stage"], **case.get("zero", {})},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    if bf16:
        config["bf16"] = {"enabled": True}
    config.update(case.get("extra", {}))
    t0 = time.time()
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    out["initialize_s"] = time.time() - t0
    out["optimizer"] = type(engine.optimizer).__name__
    if out["optimizer"] == "FP16_UnfusedOptimizer":
        return {"case": case["name"], "skipped": f"DeepSpeed {deepspeed.__version__} does not partition bf16 + fp32 "
                "accumulation at stage 1 (fixed in 0.18.5): the client gets whole fp32 copies"}

    zmap = build_zero_map(engine, named)
    zmap.check()
    out["stage"], out["world"], out["rank"] = zmap.stage, zmap.world_size, zmap.rank
    out["map"] = [[f.flat_index, f.group_index, p.rank, p.numel,
                   [[s.name, s.param_index, s.local_offset, s.global_start, s.global_stop] for s in p.segments],
                   [[q.local_offset, q.numel, q.kind] for q in p.padding]]
                  for f in zmap.flats for p in f.partitions]
    default_named = build_zero_map(engine)  # names from DeepSpeed's own param_names
    if [[(s.name, s.local_offset, s.global_start, s.global_stop) for s in p.segments]
            for f in default_named.flats for p in f.partitions] != \
            [[(s.name, s.local_offset, s.global_start, s.global_stop) for s in p.segments]
             for f in zmap.flats for p in f.partitions]:
        errors.append("map built from engine.param_names differs from the one built from named_parameters()")

    # 1. this rank's flat partitions read through the map equal the original values, exactly
    tensors = flat_tensors(engine)
    mismatched = []
    for f, t in zip(zmap.flats, tensors):
        if t.dtype != torch.float32 or t.dim() != 1:
            errors.append(f"flat {f.flat_index}: {t.dtype} {tuple(t.shape)}")
        for seg, view in zmap.local_views(f.flat_index, t):
            want = expected[seg.name].reshape(-1)[seg.global_start:seg.global_stop]
            if not torch.equal(view, want):
                mismatched.append((seg.name, seg.global_start, seg.global_stop))
    if mismatched:
        errors.append(f"values differ for segments {mismatched}")
    out["local_elements"] = sum(s.numel for f in zmap.flats for s in f.partitions[zmap.rank].segments)

    # 2. one training step: what the client sees at step(), and its grads through the map
    for r in range(world):
        (ref(_inputs(r)) / world).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    seen = []

    def check(o):
        visible = zmap.stepping(o.param_groups)
        call = {"groups_visible": len(o.param_groups), "flats": []}
        for pos, f, p in visible:
            g = o.param_groups[pos]
            if g.get("rule") != ("muon" if f.group_index == 0 else "adamw"):
                errors.append(f"flat {f.flat_index} stepped in a group with rule {g.get('rule')}")
            if p.grad is None:
                errors.append(f"flat {f.flat_index}: no .grad at step()")
                continue
            for seg, view in zmap.local_views(f.flat_index, p.grad):
                want = ref_grads[seg.name].reshape(-1)[seg.global_start:seg.global_stop]
                tol = 3e-2 if bf16 else 1e-5
                err = ((view - want).abs().max() / ref_grads[seg.name].abs().max().clamp_min(1e-12)).item()
                if err > tol:
                    errors.append(f"grad of {seg.name}[{seg.global_start}:{seg.global_stop}] off by {err:.2e}")
            call["flats"].append(f.flat_index)
        # BF16_Optimizer steps every group at once; the others one flat per call
        if len(visible) != (len(zmap.flats) if zmap.kind == "bf16_zero1" else 1):
            errors.append(f"{len(visible)} tensors visible in one step() call")
        seen.append(call)

    opt.check = check
    loss = engine(_inputs(rank))
    engine.backward(loss)
    engine.step()
    opt.check = None
    out["step_calls"] = seen
    out["errors"] = errors
    return out


def worker(rank: int, world: int, out_dir: str) -> None:
    """One rank (started by tests/distributed/ds_harness.py, which sets the rendezvous variables)."""
    torch.set_num_threads(1)
    import datetime

    import deepspeed

    t0 = time.time()
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S))
    report = {"deepspeed": deepspeed.__version__, "init_distributed_s": time.time() - t0, "cases": {}}
    for case in CASES:
        t = time.time()
        try:
            res = _run_case(case, rank, world)
        except Exception:  # report, keep the other ranks' collectives in step for the next case
            import traceback

            res = {"case": case["name"], "errors": [traceback.format_exc()]}
        res["seconds"] = time.time() - t
        report["cases"][case["name"]] = res
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    leave_worker()


# ------------------------------------------------------------------------------------------ launcher
def _launch(world: int, out_dir: Path) -> dict:
    from tests.distributed.ds_harness import launch

    launch(world, "tests.distributed.test_zero_map:worker", out_dir, timeout_s=WORKER_TIMEOUT_S)
    return {rank: json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def reports(request, tmp_path_factory):
    pytest.importorskip("deepspeed")
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"zero_map_w{world}"))


def _case(reports, name):
    world, by_rank = reports
    results = [by_rank[r]["cases"][name] for r in range(world)]
    if "skipped" in results[0]:
        pytest.skip(results[0]["skipped"])
    return world, results


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", CASE_NAMES)
def test_partitions_read_back_exactly(reports, name):
    world, results = _case(reports, name)
    for rank, res in enumerate(results):
        assert not res["errors"], f"rank {rank}: " + "\n".join(res["errors"])
        assert res["rank"] == rank and res["world"] == world


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_rank_computes_the_same_map(reports, name):
    _, results = _case(reports, name)
    assert all(res["map"] == results[0]["map"] for res in results)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_segments_tile_each_parameter_once(reports, name):
    world, results = _case(reports, name)
    per_param = {}
    for flat_index, group_index, rank, numel, segments, padding in results[0]["map"]:
        pieces = sorted([(s[2], s[4] - s[3]) for s in segments] + [(q[0], q[1]) for q in padding])
        assert [o for o, _ in pieces] == [sum(n for _, n in pieces[:i]) for i in range(len(pieces))]
        assert sum(n for _, n in pieces) == numel
        for s in segments:
            per_param.setdefault(s[0], []).append((s[3], s[4]))
    sizes = {n: p.numel() for n, p in Tiny().named_parameters() if p.requires_grad}
    assert set(per_param) == set(sizes)  # the frozen param is not optimised
    for name_, runs in per_param.items():
        runs.sort()
        assert runs[0][0] == 0 and runs[-1][1] == sizes[name_]
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:])), f"{name_}: {runs}"
    # each rank verified exactly its own elements, and together they cover every element once
    assert sum(res["local_elements"] for res in results) == sum(sizes.values())


@pytest.mark.parametrize("name, cls, stage", [
    ("zero1", "DeepSpeedZeroOptimizer", 1), ("zero2", "DeepSpeedZeroOptimizer", 2),
    ("zero3", "DeepSpeedZeroOptimizer_Stage3", 3), ("zero1_bf16_fp32_accum", "BF16_Optimizer", 1)])
def test_engine_optimizer_class(reports, name, cls, stage):
    _, results = _case(reports, name)
    assert results[0]["optimizer"] == cls and results[0]["stage"] == stage


def test_zero12_steps_once_per_group_seeing_only_that_group(reports):
    _, results = _case(reports, "zero2")
    assert [c["flats"] for c in results[0]["step_calls"]] == [[0], [1]]
    assert all(c["groups_visible"] == 1 for c in results[0]["step_calls"])


def test_bf16_optimizer_steps_once_with_every_group(reports):
    _, results = _case(reports, "zero1_bf16_fp32_accum")
    assert [c["flats"] for c in results[0]["step_calls"]] == [[0, 1]]


def test_zero3_steps_once_per_sub_group(reports):
    _, results = _case(reports, "zero3_subgroups")
    n_flats = len({m[0] for m in results[0]["map"]})
    assert n_flats > 2  # sub_group_size=20 splits both param groups
    assert [c["flats"] for c in results[0]["step_calls"]] == [[k] for k in range(n_flats)]
    # every group stays visible; all but the stepping one have params == []
    assert all(c["groups_visible"] == 2 for c in results[0]["step_calls"])


# ------------------------------------------------------------------------------------------ pure layout
def test_flat_buffer_cut_straddles_and_pads():
    parts = flat_buffer_partitions([("a", 0, 0, 5), ("b", 1, 6, 7)], 18, 3)  # gap of 1 after a, 5 at the end
    assert [p.numel for p in parts] == [6, 6, 6]
    assert parts[0].segments == (ZeroSegment("a", 0, 0, 0, 5),)
    assert [(q.local_offset, q.numel, q.kind) for q in parts[0].padding] == [(5, 1, "param_alignment")]
    assert parts[1].segments == (ZeroSegment("b", 1, 0, 0, 6),)
    assert parts[2].segments == (ZeroSegment("b", 1, 0, 6, 7),)
    assert [(q.local_offset, q.numel, q.kind) for q in parts[2].padding] == [(1, 5, "group_end")]
    assert parts[2].padding_mask().tolist() == [False] + [True] * 5
    with pytest.raises(ValueError):
        flat_buffer_partitions([("a", 0, 0, 5)], 7, 3)


def test_per_param_cut_pads_trailing_ranks():
    parts = per_param_partitions([("w", 0, 7), ("s", 1, 1)], 3)  # ceil(7/3) = 3, ceil(1/3) = 1
    assert [p.numel for p in parts] == [4, 4, 4]
    assert [(s.name, s.local_offset, s.global_start, s.global_stop) for s in parts[2].segments] == [("w", 0, 6, 7)]
    assert [(q.local_offset, q.numel) for q in parts[2].padding] == [(1, 2), (3, 1)]
    assert [(s.name, s.global_start, s.global_stop) for s in parts[0].segments] == [("w", 0, 3), ("s", 0, 1)]
    assert parts[1].segments[-1].name == "w" and parts[1].padding[0].local_offset == 3


def test_map_queries_and_layout_bridge():
    # group buffer: w (3x4 = 12) then b (3), 16 elements over W = 2 -> 8 per rank, 1 element of group_end padding
    parts = flat_buffer_partitions([("w", 0, 0, 12), ("b", 1, 12, 3)], 16, 2)
    zmap = ZeroMap(2, "zero12", 0, ("w", "b"), ((3, 4), (3,)), (ZeroFlat(0, 0, 2, (0, 1), parts),))
    zmap.check()
    assert [(r, s.global_start, s.global_stop) for r, s in zmap.param_segments(0)] == [(0, 0, 8), (1, 8, 12)]
    assert zmap.by_group()[0][1][0].row_span(4) == (2, 3, False, False)
    layout = zmap.layout(0)
    assert layout.holdings == (((0, 8),), ((8, 12),)) and layout.whole_rows()
    assert zmap.layout(1).holdings == ((), ((0, 3),))
    flat = torch.arange(8.0)
    assert [(s.name, v.tolist()) for s, v in zmap.local_views(0, flat)] == [("w", list(range(8)))]


def test_row_span():
    seg = ZeroSegment("w", 0, 0, 10, 27)  # rows of 7: elements 10..26 are rows 1..3
    assert seg.row_span(7) == (1, 4, True, True)
    assert ZeroSegment("w", 0, 0, 14, 28).row_span(7) == (2, 4, False, False)
