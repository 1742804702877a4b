"""Sweeps: specs (data) -> validated Configs -> one ``training.loop.train`` per run -> results tables -> figures.

    python -m sweeps optimizers   [flags]      each optimizer over its own search space (optimizers/__init__.py)
    python -m sweeps architecture [flags]      dim, depth, heads, dropout, batch size one at a time
    python -m sweeps table DIR                 rebuild DIR/results.csv, points.csv (and the verdict) from DIR/runs
    python -m sweeps plot DIR                  redraw the figures from DIR/results.csv

    optimizers.py, architecture.py   the specs, as data
    spec.py        Spec -> grids -> named, validated runs
    executors.py   how runs are run (LocalPool: worker processes, worker.py)
    ray_executor.py  RayExecutor: each run a Ray task, its files shipped as bytes (--executor ray)
    results.py     the tables: a row per finished run, statistics per configuration
    runner.py      a whole sweep: plan, lock, execute, tables
    verdict.py     optimizer sweeps: tuning, search-edge extension, confirmation seeds, the verdict
    plot.py        the figures, from the tables
"""
