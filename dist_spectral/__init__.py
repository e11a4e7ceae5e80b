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
    exchange.py   runs the plan with all_to_all_single
    engines/      adapters: replicated/DDP, DTensor (FSDP2, HSDP, EP), DeepSpeed
    optimizer.py  the torch.optim.Optimizer tying it together
    reference.py  the slow single-process oracle
"""
from . import functional
from .build import build_optimizer, resolve_groups
from .optimizer import NonFiniteGradientError, SpectralOptimizer, StepStats
from .roles import ParamInfo, classify
from .schedules import paper_schedule
from . import neighbours  # noqa: F401  (registers the rules from other papers)
from . import deepspeed  # noqa: F401  (dist_spectral.deepspeed.initialize; imports the deepspeed package only when called)

__version__ = "0.1.0"

__all__ = ["functional", "build_optimizer", "resolve_groups", "SpectralOptimizer", "StepStats",
           "NonFiniteGradientError", "ParamInfo", "classify", "paper_schedule"]
