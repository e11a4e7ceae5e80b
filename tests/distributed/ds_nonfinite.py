"""Workers for test_deepspeed_nonfinite.py: a NaN or Inf gradient in the first, a middle or the last
DeepSpeed flat (group under ZeRO-1/2, sub-group under ZeRO-3) of a tiny OLMoE at W = 2.

DeepSpeed calls ``step()`` once per flat and forms each flat's gradient just before its call, so
the whole training step must be decided at the first call. Two ways in:

- ``hook``: the gradient of one parameter of the flat becomes non-finite in backward (a tensor hook
  on rank 1; DeepSpeed's averaging spreads it). ZeRO-1 in bf16 without ``check_grad_overflow`` and
  ZeRO-2 without ``compute_grad_norm`` hand it to the optimizer; ZeRO-3 always checks the global norm
  and skips the step itself, before the optimizer is called.
- ``pending``: at the first ``step()`` call of the training step (after DeepSpeed's own norm
  check), rank 1's gradient of the flat, still in DeepSpeed's ``averaged_gradients`` unless formed,
  is made non-finite: the ZeRO-3 sub-group path through the optimizer.

Each case records whether the fp32 flats, the optimizer state and the model's parameters are bit for
bit what they were before the bad step, the skip counters, and whether the next, clean step moved
the weights again.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from tests.distributed.ds_harness import leave_worker

ENGINES = {
    "zero1": ({"stage": 1}, {"bf16": {"enabled": True, "check_grad_overflow": False}}, "hook"),
    "zero2": ({"stage": 2, "compute_grad_norm": False}, {}, "hook"),
    "zero3_subgroups": ({"stage": 3, "sub_group_size": 3000}, {}, "pending"),
    "zero3_ds_skips": ({"stage": 3, "sub_group_size": 3000}, {}, "hook"),
}
VALUES = {"nan": float("nan"), "inf": float("inf")}
WHERE = ("first", "middle", "last")


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3000 + step)
    return torch.randint(0, 97, (2, 12), generator=g)


def _snapshot(opt, model) -> list[torch.Tensor]:
    flats = opt.topology.flats
    out = [f.detach().clone() for f in flats]
    out += [v.detach().clone() for f in flats for v in opt.state[f].values()]
    # ZeRO-3: ``p`` is gathered or empty depending on the hooks' timing; its partition is ``ds_tensor``
    out += [getattr(p, "ds_tensor", p).detach().clone() for p in model.parameters()]
    return out


def _flat_position(where: str, n: int) -> int:
    return {"first": 0, "middle": n // 2, "last": n - 1}[where]


def _poison_pending(engine, opt, index: int, value: float) -> None:
    flat = opt.topology.flats[index]
    grads = [flat.grad] if flat.grad is not None else engine.optimizer.averaged_gradients[index]
    target = next(g for g in grads if g.numel())
    target.view(-1)[0] = value


def run_engine(name: str, rank: int, nonfinite: str = "skip", cases=None) -> dict:
    import dist_spectral
    from dist_spectral.deepspeed import initialize
    from tests.tiny import tiny_olmoe

    zero, extra, how = ENGINES[name]
    model = tiny_olmoe(seed=0)
    opt = dist_spectral.build_optimizer(model, "symmetric", nonfinite=nonfinite)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "zero_optimization": zero, **extra}
    engine, _, _, _ = initialize(model=model, optimizer=opt, config=config)
    zmap = opt.topology.zero_map
    params = dict(model.named_parameters())
    poison: dict = {}
    calls = []
    original_step = opt.step

    def step(closure=None):
        calls.append(1)
        if poison and len(calls) == 1 and rank == 1:
            _poison_pending(engine, opt, poison["index"], poison["value"])
        return original_step(closure)

    opt.step = step

    def train_step(step_no: int) -> None:
        calls.clear()
        ids = batch(step_no)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    train_step(0)  # state exists and is non-zero before the bad steps
    out = {"flats": len(zmap.flats), "cases": {}}
    step_no = 1
    for where, value_name in cases or [(w, v) for w in WHERE for v in VALUES]:
        if True:
            value = VALUES[value_name]
            index = _flat_position(where, len(zmap.flats))
            name = zmap.names[zmap.flats[index].param_indices[0]]
            before = _snapshot(opt, model)
            skipped, ds_skipped, counted = opt.skipped_steps, engine.skipped_steps, opt.num_steps
            handle = None
            if how == "hook" and rank == 1:
                handle = params[name].register_hook(lambda g, v=value: g + v)
            elif how == "pending":
                poison.update(index=index, value=value)
            error = None
            try:
                train_step(step_no)
            except Exception as e:  # noqa: BLE001 - recorded for the test to judge
                error = f"{type(e).__name__}: {e}"
            if handle is not None:
                handle.remove()
            poison.clear()
            after = _snapshot(opt, model)
            case = {"param": name, "index": index, "calls": len(calls), "error": error,
                    "untouched": all(torch.equal(a, b) for a, b in zip(before, after)),
                    "skipped": opt.skipped_steps - skipped, "ds_skipped": engine.skipped_steps - ds_skipped,
                    "counted": opt.num_steps - counted}
            step_no += 1
            if error is None:
                clean_before = _snapshot(opt, model)
                train_step(step_no)
                step_no += 1
                case["next_step_moved"] = not torch.equal(clean_before[0], opt.topology.flats[0])
                case["next_counted"] = opt.num_steps - counted - case["counted"]
            out["cases"][(where, value_name)] = case
            if error is not None:
                return out  # the engine is mid-step after a raise: nothing more to run on it
    return out


def worker(rank: int, world: int, out_dir: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    results = {name: run_engine(name, rank) for name in ENGINES}
    results["zero2_raise"] = run_engine("zero2", rank, nonfinite="raise", cases=[("last", "nan")])
    torch.save(results, Path(out_dir) / f"result{rank}.pt")
    leave_worker()
