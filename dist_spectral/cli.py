"""``dist-spectral``: inspect a model's roles, print a communication plan, or train.

    dist-spectral inspect --model tiny-olmoe --recipe symmetric
    dist-spectral inspect --module mypackage.model:build --module-arg layers=2
    dist-spectral plan --model qwen3-235b-a22b --world 256 --ep 8
    dist-spectral plan --model tiny-qwen3 --world 16 --tp 2 --pp 2
    dist-spectral train                       (under torchrun; the built-in default run, tiny-olmoe-fsdp)
"""
from __future__ import annotations

import argparse
import sys

import yaml


def parse_overrides(items: list[str]) -> dict:
    """``group.field=value`` / ``field=value`` strings → build_optimizer overrides (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"override {item!r}: write key=value or group.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        if "." in key:
            group, field = key.split(".", 1)
            out.setdefault(group, {})[field] = value
        else:
            out[key] = value
    return out


def _meta_model(name: str):
    from .models import build_model

    return build_model(name, device="meta")


def _user_model(spec: str, items: list[str]):
    """The ``nn.Module`` that ``package.module:factory`` returns, called with the ``KEY=VALUE`` items
    as keyword arguments (values parsed as YAML). Errors name the spec and what to fix."""
    import importlib
    import os

    from torch import nn

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--module {spec!r}: write package.module:factory, where factory() returns an nn.Module")
    kwargs = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--module-arg {item!r}: write key=value (passed to {attr} as a keyword argument)")
        key, raw = item.split("=", 1)
        kwargs[key] = yaml.safe_load(raw)
    # As with ``python -m``, a package in the current directory imports without being installed.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the module raises while importing
        raise SystemExit(f"--module {spec!r}: cannot import {module_name!r}: {type(err).__name__}: {err} "
                         "(searched: the current directory, PYTHONPATH and installed packages)") from None
    factory = target
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise SystemExit(f"--module {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise SystemExit(f"--module {spec!r}: {attr!r} is not callable ({type(factory).__name__}); name a function "
                         "or class that returns an nn.Module")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--module {spec!r}: {attr}({', '.join(items or [])}) returned a {type(model).__name__}, "
                         "not a torch.nn.Module; return the model itself")
    return model


def cmd_inspect(args) -> int:
    from .build import resolve_groups

    if args.module_arg and not args.module:
        raise SystemExit("--module-arg needs --module package.module:factory")
    model = _user_model(args.module, args.module_arg) if args.module else _meta_model(args.model)
    groups, report, infos = resolve_groups(model, args.recipe, **parse_overrides(args.set))
    where = {i.name: g for g in groups for i in g.members}
    header = f"{'parameter':<56} {'shape':<16} {'role':<18} {'group':<12} {'rule':<18} {'lr':>9} {'wd':>8}"
    print(header)
    print("-" * len(header))
    for info in infos:
        g = where[info.name]
        print(f"{info.name:<56} {str(tuple(info.shape)):<16} {info.role:<18} {g.name:<12} {g.rule:<18} {g.hyper['lr']:9.3g} {g.hyper['weight_decay']:8.2g}")
    for line in report:
        print("note:", line)
    return 0


def cmd_plan(args) -> int:
    from .planner import Parallel, simulate_step
    from .predict import Rates, predict

    model = _meta_model(args.model)
    try:
        parallel = Parallel(args.world, replicas=args.hsdp, expert_parallel=args.ep, tensor_parallel=args.tp,
                            pipeline=args.pp)
    except ValueError as err:
        raise SystemExit(f"--world {args.world} --hsdp {args.hsdp} --ep {args.ep} --tp {args.tp} --pp {args.pp}: {err}")
    rates = Rates(flops=args.flops_rate, flops_efficiency=args.flops_efficiency, bandwidth=args.bandwidth,
                  nvlink_bandwidth=args.nvlink_bandwidth, gpus_per_node=args.gpus_per_node,
                  comm_efficiency=args.comm_efficiency, latency=args.latency, hbm_bandwidth=args.hbm_bandwidth,
                  host_fixed=args.host_fixed, host_per_param=args.host_per_param, host_per_unit=args.host_per_unit)
    for stage in range(parallel.pipeline):
        if parallel.pipeline > 1:
            first = stage * parallel.stage_world_size
            print(f"{'' if stage == 0 else chr(10)}== pipeline stage {stage} of {parallel.pipeline}: its own optimizer "
                  f"on ranks {first}..{first + parallel.stage_world_size - 1} (numbered from 0 below) ==")
        sim = simulate_step(model, parallel, args.recipe, bucket_mb=args.bucket_mb,
                            element_bytes=2 if args.comm_dtype == "bfloat16" else 4,
                            replicate_below=args.replicate_below, stage=stage, **parse_overrides(args.set))
        _print_plan(sim, predict(sim, rates), rates, args)
    return 0


def _print_plan(sim, pred, rates, args) -> None:
    import numpy as np

    from .predict import format_table, summary_rows

    plan = sim.plan
    W = plan.world_size

    text = plan.describe(names=args.units).splitlines()
    head = [l for l in text if not l[:5].strip().isdigit()]
    print(head[0])
    if args.units or args.buckets:
        print("\n".join(head[1:-1]))
    sizes = [sum(plan.units[u].stop - plan.units[u].start for u in b.units) * plan.element_bytes for b in plan.buckets]
    gather = sum(len(b.gather) for b in plan.buckets)
    scatter = sum(len(b.scatter) for b in plan.buckets)
    print(f"buckets: {len(plan.buckets)} (largest {max(sizes, default=0) / 2**20:.1f} MiB of units); pieces: gather "
          f"{gather}, scatter {scatter}; collectives per step: {pred.collectives - len(sim.colsum_sizes)} all-to-all, "
          f"{len(sim.colsum_sizes)} column all-reduce")
    rows = summary_rows(sim, pred, every=args.all_ranks)
    scope = "every rank" if W <= 16 or args.all_ranks else "max / mean / min, then the slowest ranks; --all-ranks lists all"
    print(f"per rank ({scope}):")
    print(format_table(rows))
    flops = np.array([plan.polar_flops(r) for r in range(W)], dtype=np.float64)
    print(f"load balance: max/mean estimated flops {plan.balance():.4f}; polar flops per rank: max "
          f"{flops.max() / 1e9:.2f} GFLOP, mean {flops.mean() / 1e9:.2f} GFLOP")
    worst = int(np.argmax(pred.step))
    print(f"predicted optimizer step ({rates.describe()}):")
    print(f"  {pred.step.max() * 1e3:.2f} ms on the slowest rank ({worst}), mean {pred.step.mean() * 1e3:.2f} ms: "
          f"element-wise {pred.elementwise[worst] * 1e3:.2f} ms + column all-reduces {pred.colsum[worst] * 1e3:.2f} ms + "
          f"exchange {pred.exchange[worst] * 1e3:.2f} ms (compute {pred.compute[worst] * 1e3:.2f} ms, all-to-alls "
          f"{pred.comm[worst] * 1e3:.2f} ms, overlapped; {pred.serial[worst] * 1e3:.2f} ms if not) + host "
          f"{pred.host[worst] * 1e3:.2f} ms ({rates.host_fixed * 1e3:.2f} ms + {rates.host_per_param * 1e6:.2f} µs × "
          f"{int(pred.params[worst])} parameters + {rates.host_per_unit * 1e6:.2f} µs × {int(pred.units[worst])} units; "
          "benchmarks/results/host.md)")
    print(f"  AdamW on the same shards: {pred.adamw.max() * 1e3:.2f} ms")
    busy = max(pred.compute[worst], pred.comm[worst])
    if pred.exchange[worst] > 1.5 * busy and pred.exchange[worst] - busy > 1e-3:
        print(f"  the exchange waits {(pred.exchange[worst] - busy) * 1e3:.0f} ms beyond this rank's own compute and "
              "transfers: each all-to-all lasts as long as its busiest rank (few owners per bucket); try a larger "
              "--bucket-mb (memory per rank grows by about bucket/W) or --comm-dtype bfloat16")
    print(f"memory per rank (max): optimizer state {pred.state.max() / 1e9:.2f} GB (AdamW {pred.adamw_state.max() / 1e9:.2f} GB), "
          f"peak extra during the step {pred.peak_extra.max() / 1e9:.2f} GB (see dist_spectral/predict.py)")


def cmd_train(args, rest: list[str]) -> int:
    from .training import main as train_main

    return train_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dist-spectral", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="table of parameter -> shape -> role -> rule (dry run)")
    p.add_argument("--model", default="tiny-olmoe", help="preset name (in the package's configs/models) or a YAML path")
    p.add_argument("--recipe", default="symmetric", help="recipe name (in the package's configs/recipes) or a YAML path")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. router.rule=centered_row_norm")
    p.add_argument("--module", metavar="PACKAGE.MODULE:FACTORY",
                   help="your own model instead of --model: import PACKAGE.MODULE (the current directory is searched "
                        "first) and call FACTORY, which returns an nn.Module")
    p.add_argument("--module-arg", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keyword arguments for FACTORY, values parsed as YAML, e.g. layers=2")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", aliases=["predict"],
                       help="the owner/bucket plan for a simulated world size (meta tensors) and the predicted step")
    p.add_argument("--model", default="tiny-olmoe")
    p.add_argument("--recipe", default="symmetric")
    p.add_argument("--world", type=int, default=8, help="simulated ranks")
    p.add_argument("--hsdp", type=int, default=1, help="HSDP replica groups")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree (torchtitan's plan: q/k/v, gate/up, LM head column-parallel, o/down "
                        "row-parallel, embedding row-parallel), FSDP2 over the rest")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages (contiguous layers each); every stage's optimizer is planned on its own ranks")
    p.add_argument("--bucket-mb", type=float, default=256)
    p.add_argument("--comm-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--replicate-below", type=int, default=None, metavar="ELEMENTS",
                   help="units of rules without polar iterations (routers) smaller than this are computed on every "
                        "rank holding part of them; 0 = never (default: the optimizer's)")
    p.add_argument("--units", action="store_true", help="list every unit with its owner")
    p.add_argument("--buckets", action="store_true", help="list every bucket")
    p.add_argument("--all-ranks", action="store_true", help="print every rank's row")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    from .predict import Rates

    r = Rates()
    p.add_argument("--flops-rate", type=float, default=r.flops,
                   help=f"matmul peak per GPU, flop/s (default: {r.flops:.4g}, H100 SXM dense bf16)")
    p.add_argument("--flops-efficiency", type=float, default=r.flops_efficiency,
                   help=f"fraction of --flops-rate batched polar reaches (default: {r.flops_efficiency})")
    p.add_argument("--bandwidth", type=float, default=r.bandwidth,
                   help=f"inter-node bytes/s per GPU and direction (default: {r.bandwidth:.3g}, 400 Gb/s NDR InfiniBand)")
    p.add_argument("--nvlink-bandwidth", type=float, default=r.nvlink_bandwidth,
                   help=f"intra-node bytes/s per GPU and direction (default: {r.nvlink_bandwidth:.3g}, NVLink 4)")
    p.add_argument("--gpus-per-node", type=int, default=r.gpus_per_node)
    p.add_argument("--comm-efficiency", type=float, default=r.comm_efficiency,
                   help=f"fraction of link rates an all-to-all reaches (default: {r.comm_efficiency})")
    p.add_argument("--latency", type=float, default=r.latency, help=f"seconds per collective (default: {r.latency})")
    p.add_argument("--hbm-bandwidth", type=float, default=r.hbm_bandwidth,
                   help=f"memory bytes/s for element-wise work (default: {r.hbm_bandwidth:.3g}, H100 HBM3)")
    p.add_argument("--host-fixed", type=float, default=r.host_fixed,
                   help=f"host (Python) seconds per step (default: {r.host_fixed:g}, from benchmarks/host.py)")
    p.add_argument("--host-per-param", type=float, default=r.host_per_param,
                   help=f"host seconds per optimized parameter a rank holds (default: {r.host_per_param:g}, from "
                        "benchmarks/host.py)")
    p.add_argument("--host-per-unit", type=float, default=r.host_per_unit,
                   help=f"host seconds per whole-matrix unit a rank handles (default: {r.host_per_unit:g}, from "
                        "benchmarks/host.py)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train (see launch/train.py); run under torchrun or deepspeed", add_help=False)
    p.set_defaults(func=None)

    if argv and argv[0] == "train":
        return cmd_train(None, argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
