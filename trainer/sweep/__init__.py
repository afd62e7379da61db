"""Sweeps: many ordinary training runs compared on one fair objective, with Optuna as engine.

Read in this order: ``spec`` (the sweep file) → ``expand`` (every configuration × seed as a
checked run config) → ``engine`` (Optuna storage, study, sampler, pruner) → ``claims`` (which
worker runs which trial; dead workers) → ``worker`` (the loop) → ``process`` (one run as a
training process; ``trainer/run/trial.py`` is its training side) → ``results`` / ``verdict``
/ ``report``. ``optuna_adapter`` holds the few uses of Optuna beyond its stable API.
docs/sweeps.md is the user's guide.

Imports inside the package run one way, with no cycle (``tests/test_sweep_imports.py``):
``spec`` imports only ``overrides``, ``engine`` imports ``spec``, ``expand`` imports
``engine``, and ``worker`` sits on top.
"""
