"""DeepSpeed ZeRO runs of a real tiny MoE (OLMoE, 97-token vocabulary, 3 experts) with the
`symmetric` recipe (one case: AuON, its rows cut by the partitions), for the parity tests.

The gradients DeepSpeed hands the optimizer (averaged over ranks and micro-batches) are recorded
through the ZeRO map and reassembled, so the reference steps on exactly the same gradients and any
difference is the optimizer's. (That those gradients equal a single-process backward is tested
in test_zero_map.py.)"""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from tests.distributed.ds_harness import leave_worker

STEPS = 3
CASES = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero3_subgroups": {"stage": 3, "zero": {"sub_group_size": 3000}},
    "zero2_accum": {"stage": 2, "accum": 2},
    # AuON on every 2-D matrix, embedding and head included: ZeRO cuts their rows, and the brake's
    # whole-matrix sums must skip the zero-filled elements. SPECTRA on the router.
    "zero2_auon": {"stage": 2, "recipe": "auon", "overrides": {"embedding": {"rule": "auon", "lr": 0.05},
                                                                "lm_head": {"rule": "auon", "lr": 0.05},
                                                                "router": {"rule": "spectra", "lr": 1e-3}}},
}


def batch(step: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    return torch.randint(0, 97, (2, 12), generator=g)


def ds_config(case: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": case.get("accum", 1),
            "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": case["stage"], **case.get("zero", {})}}


def run_case(name: str, rank: int, world: int) -> dict:
    import deepspeed

    import dist_spectral
    from dist_spectral.deepspeed import initialize
    from tests.tiny import tiny_olmoe

    case = CASES[name]
    model = tiny_olmoe(seed=0)
    opt = dist_spectral.build_optimizer(model, case.get("recipe", "symmetric"), **case.get("overrides", {}))
    engine, _, _, _ = initialize(model=model, optimizer=opt, config=ds_config(case))
    shapes = dict(zip(opt.topology.zero_map.names, opt.topology.zero_map.shapes))
    current: dict[str, torch.Tensor] = {}
    step_calls = []
    original_step = opt.step

    cut_row_params = set()

    def recording_step(closure=None):
        step_calls.append(len(opt.param_groups))
        for it in opt._items():  # this rank's pieces of each parameter's gradient
            if it.group["rule"] in ("row_norm", "centered_row_norm", "auon") and not it.layout.whole_rows():
                cut_row_params.add(it.name)
            full = current.setdefault(it.name, torch.zeros(shapes[it.name]).reshape(-1))
            for (a, b) in it.layout.holdings[rank]:
                full[a:b] = it.grad
        return original_step(closure)

    opt.step = recording_step
    grads = []
    for step in range(STEPS):
        for micro in range(case.get("accum", 1)):
            ids = batch(step, micro)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        for g in current.values():  # every element is on exactly one rank: the sum reassembles it
            torch.distributed.all_reduce(g)
        grads.append({n: g.reshape(shapes[n]) for n, g in current.items()})
        current = {}
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=case["stage"] == 3):
        full = {n: p.detach().clone().float() for n, p in params}
    return {"params": full if rank == 0 else None, "grads": grads if rank == 0 else None,
            "polar_flops": opt.total_polar_flops, "step_calls": step_calls, "cut_row_params": cut_row_params,
            "planned": {name for key in opt._plans for name in key}}


def worker(rank: int, world: int, out_dir: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    results = {name: run_case(name, rank, world) for name in CASES}
    torch.save(results, Path(out_dir) / f"result{rank}.pt")
    leave_worker()
