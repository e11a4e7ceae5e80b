"""Adapters for the trainers people already use.

- :mod:`dist_spectral.integrations.torchtitan`: ``DistSpectralOptimizers``, a torchtitan
  ``OptimizersContainer`` whose config names a recipe.
- :mod:`dist_spectral.integrations.hf`: ``SpectralTrainer`` (a ``transformers.Trainer``) and
  ``prepare`` (for an ``accelerate.Accelerator`` loop), which build the optimizer where
  Accelerate's FSDP2 and DeepSpeed plugins need it.

On one process the plain ``Trainer`` needs no adapter: ``Trainer(..., optimizers=(build_optimizer(model),
schedule))``. Each module imports its trainer only when used, so ``import dist_spectral`` needs none.
"""
