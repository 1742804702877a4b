"""The optimizer sweep, as data: ``python -m sweeps optimizers``.

Every registered optimizer is swept over its own search space, declared with its knobs in the registry
(``optimizers/__init__.py``; ``--dry-run`` lists the grids). A command-line flag replaces that axis for
every optimizer that has the knob.
"""

BASE = {
    "data.train_fraction": 0.4,
    "train.epochs": 400,
    "train.early_stop_val_acc": 0.9,  # also the sweep's target accuracy
}

SEEDS = [0, 1, 2]
