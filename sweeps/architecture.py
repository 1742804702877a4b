"""The architecture sweep, as data: ``python -m sweeps architecture``.

Each knob of ``AXES`` is varied one at a time while the others stay at ``CENTER``, for every registered
optimizer at its registry defaults (``--from-results DIR`` takes each optimizer's best configuration from
an optimizer sweep instead).
"""
from sweeps.optimizers import BASE as OPTIMIZER_BASE

BASE = dict(OPTIMIZER_BASE)

CENTER = {"model.dim": 128, "model.depth": 2, "model.heads": 1, "model.dropout": 0.2, "train.batch_size": 512}

AXES = {
    "model.dim": [32, 64, 128, 256],
    "model.depth": [1, 2, 3, 4],
    "model.heads": [1, 2, 4, 8],
    "model.dropout": [0.0, 0.1, 0.2, 0.3],
    "train.batch_size": [64, 128, 512, 2048],
}

SEEDS = [0, 1, 2]
