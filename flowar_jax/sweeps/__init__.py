"""Sweeps over config keys: declared in configs/sweeps/*.py, run by launch/sweep.py (see docs/sweeps.md)."""
from flowar_jax.sweeps.spec import Choice, LogUniform, Point, Sweep, Uniform, load_sweep

__all__ = ["Choice", "LogUniform", "Point", "Sweep", "Uniform", "load_sweep"]
