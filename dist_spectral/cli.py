"""``dist-spectral``: inspect a model's roles, print a communication plan, or train.

    dist-spectral inspect --model tiny-olmoe --recipe symmetric
    dist-spectral plan --model qwen3-235b-a22b --world 256 --ep 8
    dist-spectral train --config configs/runs/tiny-olmoe-fsdp.yaml     (under torchrun)
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


def cmd_inspect(args) -> int:
    from .build import resolve_groups

    model = _meta_model(args.model)
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
    from .planner import Parallel, simulate

    model = _meta_model(args.model)
    parallel = Parallel(args.world, replicas=args.hsdp, expert_parallel=args.ep)
    plan = simulate(model, parallel, args.recipe, bucket_mb=args.bucket_mb,
                    element_bytes=2 if args.comm_dtype == "bfloat16" else 4, **parse_overrides(args.set))
    text = plan.describe(names=args.units)
    if not args.all_ranks and args.world > 8:
        lines = text.splitlines()
        head = [l for l in lines if not l[:5].strip().isdigit()]
        ranks = [l for l in lines if l[:5].strip().isdigit()]
        text = "\n".join(head + ranks[:4] + [f"  ... {len(ranks) - 8} ranks ..."] + ranks[-4:])
    print(text)
    flops = [plan.polar_flops(r) for r in range(plan.world_size)]
    print(f"polar flops per rank: max {max(flops) / 1e9:.2f} GFLOP, mean {sum(flops) / len(flops) / 1e9:.2f} GFLOP; "
          f"balance (max/mean estimated cost) {plan.balance():.3f}")
    return 0


def cmd_train(args, rest: list[str]) -> int:
    from .training import main as train_main

    return train_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dist-spectral", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="table of parameter -> shape -> role -> rule (dry run)")
    p.add_argument("--model", default="tiny-olmoe", help="preset name in configs/models or a YAML path")
    p.add_argument("--recipe", default="symmetric", help="recipe name in configs/recipes or a YAML path")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. router.rule=centered_row_norm")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="the owner/bucket plan for a simulated world size (meta tensors)")
    p.add_argument("--model", default="tiny-olmoe")
    p.add_argument("--recipe", default="symmetric")
    p.add_argument("--world", type=int, default=8, help="simulated ranks")
    p.add_argument("--hsdp", type=int, default=1, help="HSDP replica groups")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    p.add_argument("--bucket-mb", type=float, default=256)
    p.add_argument("--comm-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--units", action="store_true", help="list every unit with its owner")
    p.add_argument("--all-ranks", action="store_true", help="print every rank's row")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train (see launch/train.py); run under torchrun or deepspeed", add_help=False)
    p.set_defaults(func=None)

    if argv and argv[0] == "train":
        return cmd_train(None, argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
