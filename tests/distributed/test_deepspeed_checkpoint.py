"""DeepSpeed checkpoints resume exactly: train k steps and ``save_checkpoint``, continue to n; a fresh
engine (another init seed) ``load_checkpoint``s at k and continues to n. At n both runs must hold the
same parameters, optimizer state, step counters and learning rates, step by step.

W = 2, every case in one launch (tests/distributed/ds_harness.py): ZeRO-2, ZeRO-3, ZeRO-3 with
several sub-groups (several ``step()`` calls per step, several flats per param group) and ZeRO-2
with gradient accumulation and clipping. Tiny OLMoE, recipe ``symmetric`` (row-norm, centred
row-norm, left-spectral, per-head and per-expert Muon, AdamW); and rules with carried state:
``conda`` at ZeRO-2 (basis refreshed every 2 steps), ``aro`` at ZeRO-3. ``paper_schedule`` passed to
``deepspeed.initialize`` (DeepSpeed steps it and checkpoints it), different data on each rank.

Loading goes through ``dist_spectral.training.launchers.deepspeed_load`` (what ``--resume`` does),
and, in case ``zero2_bare``, through a plain ``engine.load_checkpoint``: the optimizer keeps its
ZeRO param-group dicts in sync across ``load_state_dict`` itself.

Measured: bitwise equal (parameters, every state tensor, lrs) on all cases, so the test asks for
``torch.equal``: the resumed run does the same float operations in the same order.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from tests.distributed.ds_harness import leave_worker

K, N = 3, 6  # save after K steps, compare after N
CASES = {
    "zero2": {"zero_optimization": {"stage": 2}},
    "zero3": {"zero_optimization": {"stage": 3}},
    "zero3_subgroups": {"zero_optimization": {"stage": 3, "sub_group_size": 3000}},
    "zero2_accum_clip": {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2, "gradient_clipping": 0.05},
    # Carried whole-matrix state (Conda's basis and second moment, ARO's rotation) lives in the flats:
    # the basis is refreshed every 2 steps, so the resumed run refreshes from restored state.
    "zero2_conda": {"zero_optimization": {"stage": 2}, "recipe": "conda",
                    "overrides": {"attention": {"update_proj_gap": 2}, "mlp": {"update_proj_gap": 2}}},
    "zero3_aro": {"zero_optimization": {"stage": 3}, "recipe": "aro"},
}
RECIPE_KEYS = ("recipe", "overrides")


def batch(step: int, micro: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * rank + 10 * step + micro)
    return torch.randint(0, 97, (2, 12), generator=g)


def _config(case: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, **case}


def _run(name: str, rank: int, seed: int, start: int, stop: int, ckpt: Path, save_at: int | None,
         bare_load: bool = False) -> dict:
    """Build (init ``seed``), optionally load tag ``start``, train to ``stop`` saving at ``save_at``."""
    import deepspeed

    import dist_spectral
    from dist_spectral.deepspeed import initialize
    from dist_spectral.engines.zero_map import flat_tensors
    from dist_spectral.training.launchers import deepspeed_load
    from tests.tiny import tiny_olmoe

    case = CASES[name]
    config = _config({k: v for k, v in case.items() if k not in RECIPE_KEYS})
    model = tiny_olmoe(seed=seed)
    opt = dist_spectral.build_optimizer(model, case.get("recipe", "symmetric"), **case.get("overrides", {}))
    sched = dist_spectral.paper_schedule(opt, N, warmup=2, constant_fraction=0.3)
    engine, _, _, _ = initialize(model=model, optimizer=opt, config=config, lr_scheduler=sched)
    if start and bare_load:
        engine.load_checkpoint(str(ckpt), tag=f"step{start}")
    elif start:
        assert deepspeed_load(engine, opt, str(ckpt), f"step{start}")["step"] == start
    lrs = {}
    for step in range(start, stop):
        for micro in range(config.get("gradient_accumulation_steps", 1)):
            ids = batch(step, micro, rank)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        lrs[step + 1] = [g["lr"] for g in opt.param_groups]
        if step + 1 == save_at:
            engine.save_checkpoint(str(ckpt), tag=f"step{save_at}", client_state={"step": save_at})
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=config["zero_optimization"]["stage"] == 3):
        full = {n: p.detach().clone() for n, p in params}
    # This rank's flats (at ZeRO-3 the groups list none outside step(), so not opt.state_dict()).
    state = {i: {k: v.clone() for k, v in opt.state[flat].items()} for i, flat in enumerate(flat_tensors(engine))}
    return {"params": full, "state": state, "lrs": lrs, "last_epoch": sched.last_epoch}


def worker(rank: int, world: int, out_dir: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    results = {}
    for name in CASES:
        ckpt = Path(out_dir) / name
        results[name] = {"full": _run(name, rank, 0, 0, N, ckpt, save_at=K),
                         "resumed": _run(name, rank, 1, K, N, ckpt, save_at=None)}
    results["zero2_bare"] = {"full": results["zero2"]["full"],
                             "resumed": _run("zero2", rank, 1, K, N, Path(out_dir) / "zero2", None, bare_load=True)}
    torch.save(results, Path(out_dir) / f"result{rank}.pt")
    leave_worker()


# ----------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from tests.distributed.ds_harness import launch

    d = tmp_path_factory.mktemp("ds_ckpt")
    launch(2, "tests.distributed.test_deepspeed_checkpoint:worker", d)
    return [torch.load(d / f"result{r}.pt", weights_only=False) for r in range(2)]


BARE = "zero2_bare"  # a plain engine.load_checkpoint, no helper


@pytest.mark.parametrize("case", list(CASES) + [BARE])
def test_resumed_parameters_equal_the_uninterrupted_run(results, case):
    full, resumed = results[0][case]["full"], results[0][case]["resumed"]
    assert full["params"].keys() == resumed["params"].keys()
    init = _initial_params()
    for name, value in full["params"].items():
        assert not torch.equal(value, init[name]), f"{case} {name}: the run never moved it"
        assert torch.equal(resumed["params"][name], value), \
            f"{case} {name}: max difference {(resumed['params'][name] - value).abs().max():.3e}"


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_optimizer_state_and_counters_equal(results, case):
    for rank, result in enumerate(results):
        full, resumed = result[case]["full"], result[case]["resumed"]
        assert full["state"].keys() == resumed["state"].keys() and full["state"]
        for key, state in full["state"].items():
            assert float(state["step"]) == N, f"{case} rank {rank} flat {key}: step {float(state['step'])}"
            assert state.keys() == resumed["state"][key].keys()
            for k, v in state.items():
                assert torch.equal(resumed["state"][key][k], v), f"{case} rank {rank} flat {key} {k}"


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_learning_rates_follow_the_schedule(results, case):
    full, resumed = results[0][case]["full"], results[0][case]["resumed"]
    assert full["last_epoch"] == resumed["last_epoch"] == N  # one scheduler step per optimizer step
    assert sorted(resumed["lrs"]) == list(range(K + 1, N + 1))
    for step, lrs in resumed["lrs"].items():
        assert lrs == full["lrs"][step], step
    assert len({tuple(v) for v in full["lrs"].values()}) > 1  # the schedule moved within the run


def _initial_params() -> dict:
    from tests.tiny import tiny_olmoe

    return {n: p.detach().clone() for n, p in tiny_olmoe(seed=0).named_parameters()}
