"""The optimizer sweep, as data: ``python -m sweeps optimizers`` (the reference experiment).

Every registered optimizer is swept over the axes of ``GRID`` that it uses: an ``optim.*``
hyperparameter missing from its registry defaults is left out for it (QUAD has no ``beta2``, so
AdamW's ``beta2`` axis does not multiply QUAD's runs). A command-line flag replaces an axis.
"""

BASE = {
    "data.train_fraction": 0.4,
    "train.epochs": 400,
    "train.early_stop_val_acc": 0.9,  # also the sweep's target accuracy
}

GRID = {
    "optim.lr": [3e-3, 1e-3, 3e-4],
    "optim.weight_decay": [0.0, 0.001, 0.01, 0.1, 0.3],
    "optim.beta1": [0.9, 0.95],
    "optim.beta2": [0.99],  # AdamW only
}

SEEDS = [0, 1, 2]
