"""DeepSpeed integration: ``dist_spectral.deepspeed.initialize(model=..., optimizer=..., config=...)``.

>>> opt = dist_spectral.build_optimizer(model, "symmetric")
>>> engine, opt, _, _ = dist_spectral.deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

See :mod:`dist_spectral.engines.deepspeed`.
"""
from .engines.deepspeed import initialize, prepare_config

__all__ = ["initialize", "prepare_config"]
