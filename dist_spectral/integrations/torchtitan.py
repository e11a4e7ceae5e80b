"""torchtitan integration: a recipe chosen in the run's configuration.

torchtitan builds its optimizer from ``Trainer.Config.optimizer`` after parallelising the model
(FSDP2/HSDP/TP/EP), through ``config.optimizer.build(model_parts=...)``. Put
:class:`DistSpectralOptimizers` there::

    from dist_spectral.integrations.torchtitan import DistSpectralOptimizers

    def llama3_debug_symmetric():          # a config_registry function: --module my.registry --config ...
        config = llama3_debugmodel()
        config.optimizer = DistSpectralOptimizers.Config(recipe="symmetric", lr_scale=1.0)
        return config

Roles come from torchtitan's own module names (``tok_embeddings``, ``attention.qkv_linear.wqkv`` in
its ``[kv_heads, q_per_kv + 2, head_dim]`` rows, ``wo``, ``feed_forward.w1/w2/w3``,
``moe.routed_experts.inner_experts.w1_EFD``, ``moe.router.gate``, MLA ``wkv_a``/``wkv_b``, the
output ``lm_head``; see :mod:`dist_spectral.roles`). The container is torchtitan's own
``OptimizersContainer`` with one :class:`~dist_spectral.SpectralOptimizer` per model part, so its LR
schedulers, its MoE load-balancing pre-step hook and its DCP checkpointer (flat, FQN-keyed state)
work unchanged; the step counters ``num_steps`` / ``skipped_steps`` ride in that flat state under
``dist_spectral.<part>.num_steps``.

Tested with torchtitan 0.3.0 on torch 2.13.0 (see the README for what runs where).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..build import build_optimizer

try:
    from torchtitan.components.optimizer import OptimizersContainer
except ImportError as e:  # an optional integration: say what to install, not a bare ImportError
    raise ImportError("dist_spectral.integrations.torchtitan needs torchtitan (pip install torchtitan; tested with "
                      "0.3.0 on torch 2.13.0)") from e

_COUNTERS = ("num_steps", "skipped_steps")


class DistSpectralOptimizers(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` holding one dist_spectral optimizer per model part.

    Args:
        config (DistSpectralOptimizers.Config): the recipe and its overrides.
        model_parts (list[nn.Module]): the parallelised model parts (pipeline stages), each classified
            on its own.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        recipe: str = "symmetric"
        """A built-in recipe name (``symmetric``, ``muon``, ``adamw``, ...) or a YAML path."""

        lr_scale: float = 1.0
        """Multiplies every group's lr (the recipe's own lrs are tuned for its schedule)."""

        nonfinite: str = "skip"
        """``skip`` or ``raise`` on a non-finite gradient."""

        bucket_mb: float = 256.0
        """Memory bound of one exchange bucket in MiB."""

        overrides: dict[str, Any] = field(default_factory=dict)
        """Further ``build_optimizer`` overrides, e.g. ``{"router": {"rule": "centered_row_norm"}}``."""

    def __init__(self, config: Config, *, model_parts: list) -> None:
        if config.param_groups:
            raise ValueError(f"optimizer.param_groups: {len(config.param_groups)} torchtitan pattern groups were given "
                             f"to DistSpectralOptimizers, whose groups come from recipe {config.recipe!r} by parameter "
                             "role; drop param_groups, or change a group through optimizer.overrides "
                             "(e.g. {'embedding': {'lr': 0.01}})")
        self.model_parts = model_parts
        self.optimizers = [build_optimizer(part, config.recipe, nonfinite=config.nonfinite, bucket_mb=config.bucket_mb,
                                           lr_scale=config.lr_scale, **config.overrides)
                           for part in model_parts]
        params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
        self._validate_params(params)
        self._post_init(params)

    def state_dict(self) -> dict[str, Any]:
        """torchtitan's flat, FQN-keyed optimizer state, plus each part's step counters."""
        out = super().state_dict()
        for i, opt in enumerate(self.optimizers):
            for key in _COUNTERS:
                out[f"dist_spectral.{i}.{key}"] = getattr(opt, key)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` saved; a checkpoint without the counters keeps the current ones."""
        super().load_state_dict(state_dict)
        for i, opt in enumerate(self.optimizers):
            for key in _COUNTERS:
                if f"dist_spectral.{i}.{key}" in state_dict:
                    setattr(opt, key, int(state_dict[f"dist_spectral.{i}.{key}"]))
