"""dist_spectral: symmetry-compatible spectral optimizers for sharded LLM pretraining.

>>> opt = dist_spectral.build_optimizer(model, recipe="symmetric")   # after fully_shard / DDP

Layers, from math to machines::

    functional/   pure update-rule math (polar, row norms, spectral rules)
    rules.py      momentum + direction per rule, with its locality
    roles.py      classify(model): which class of weight each parameter is
    recipes.py    YAML recipes: role/name patterns -> rule and hyperparameters
    blocks.py     how a parameter splits into matrices (heads, experts, fused halves)
    layout.py     where each element lives (one description for every engine)
    plan.py       owners, buckets and pieces for whole-matrix rules (pure data)
    route.py      which path a parameter takes (element, rows, owner exchange); its plan entry
    exchange.py   runs the plan with all_to_all_single
    engines/      the Engine protocol and one adapter per engine: replicated/DDP, DTensor
                  (FSDP2, HSDP, EP), DeepSpeed ZeRO; Collectives over one process group
    stats.py      what a step moved and computed (opt.last_stats)
    optimizer.py  the torch.optim.Optimizer tying it together
    planner.py    plans of simulated clusters on meta tensors (no optimizer needed)
    reference.py  the slow single-process oracle
"""
from . import functional
from .build import build_optimizer, resolve_groups
from .optimizer import NonFiniteGradientError, SpectralOptimizer
from .roles import ParamInfo, classify
from .schedules import paper_schedule
from .stats import StepStats
from . import neighbours  # noqa: F401  (registers the rules from other papers)
from . import deepspeed  # noqa: F401  (dist_spectral.deepspeed.initialize; imports the deepspeed package only when called)

__version__ = "0.1.0"

__all__ = ["functional", "build_optimizer", "resolve_groups", "SpectralOptimizer", "StepStats",
           "NonFiniteGradientError", "ParamInfo", "classify", "paper_schedule"]
