"""Adapters for the trainers people already use.

- :mod:`dist_spectral.integrations.torchtitan`: ``DistSpectralOptimizers``, a torchtitan
  ``OptimizersContainer`` whose config names a recipe.

The Hugging Face ``Trainer`` needs no adapter: ``Trainer(..., optimizers=(build_optimizer(model),
schedule))``. Each module imports its trainer only when used, so ``import dist_spectral`` needs none.
"""
