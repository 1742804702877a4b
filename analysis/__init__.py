"""Progress measures for grokking over a run's snapshots (Nanda et al. 2023): ``python -m analysis RUN_DIR``.

Modules: ``group`` (the cyclic group of the operation, primitive root, discrete log), ``fourier`` (basis,
norms, Gini, key-frequency rule, logit projections), ``measures`` (one snapshot's measures), ``run`` (the run
directory in, ``analysis.jsonl``/``analysis.json`` out), ``figures``, ``synthetic`` (a synthetic run for tests
and timing).
"""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)
