"""Sweeps: specs (data) -> validated Configs -> ``main.train`` per run -> results table -> figures.

    python -m sweeps optimizers   [flags]      lr x weight decay x beta1 grid per optimizer
    python -m sweeps architecture [flags]      dim, depth, heads, dropout, batch size one at a time
    python -m sweeps table DIR                 rebuild DIR/results.csv and DIR/points.csv from DIR/runs
    python -m sweeps plot DIR                  redraw the figures from DIR/results.csv

``sweeps/optimizers.py`` and ``sweeps/architecture.py`` hold the specs; ``sweeps/runner.py`` expands,
runs and tabulates them; ``sweeps/plot.py`` draws the figures. See ``python -m sweeps optimizers --help``.
"""
from sweeps.runner import Spec, apply_axes, default_spec, expand, rebuild_table, run_sweep, summarize  # noqa: F401
