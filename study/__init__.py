"""sinstudy: Optuna hyperparameter studies of a small MLP that learns y = sin(x) on [0, 2*pi)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
