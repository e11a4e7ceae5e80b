"""Rules from neighbouring papers, on the same engine: each is one module that defines a
:class:`~dist_spectral.rules.Rule` and registers it, so recipes can name it.

::

    spectra.py   SPECTRA soft spectral clipping around a base update (optionally of the gradient too)
    auon.py      AuON: cosh-normalised momentum, one scalar all-reduce per matrix
    conda.py     Conda: Adam's second moment in the momentum's singular basis
    aro.py       ARO: a learned rotation and a base rule in the rotated frame (aro_adam: Adam's)
"""
from . import conda, aro  # noqa: E402,F401  (each registers its rule)
from . import spectra, auon  # noqa: E402,F401
