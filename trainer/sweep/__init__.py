"""Sweeps: many ordinary training runs compared on one fair objective, with Optuna as engine.

Read in this order: ``spec`` (the sweep file) → ``expand`` (every configuration × seed as a
checked run config) → ``engine`` (Optuna storage, study, sampler, pruner) → ``claims`` (which
worker runs which trial; dead workers) → ``worker`` (the loop) → ``process`` (one run as a
training process; ``guard`` is its training side) → ``results`` / ``verdict`` / ``report``.
docs/sweeps.md is the user's guide.
"""
