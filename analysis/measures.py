"""Progress measures of one snapshot, from its weights and its logits over the group grid (NumPy only).

A ``Grid`` lists every pair ``(a, b)`` of group elements in index order (row ``i·n + j`` holds ``a`` of
index ``i`` and ``b`` of index ``j``), the answer index ``z`` of each, its label token and whether the
run trained on it. Under ×, ÷ that leaves out the pairs with ``a = 0`` or ``b = 0`` (answer 0, outside the
multiplicative group): every measure here is over ``a, b, a∘b ≠ 0`` there.
"""
from dataclasses import dataclass

import numpy as np

from . import fourier
from .group import Group

EMBEDDING, UNEMBEDDING = "embedding.weight", "out.weight"  # flattened mlx names of W_E (V, D) and W_U (V, D)

# The keys of a row of analysis.jsonl, in order (lists are per frequency k = 1..n//2).
ROW_KEYS = ("epoch", "step", "sum_sq_weights", "embed_gini", "unembed_gini", "embed_constant_norm",
            "loss_train", "acc_train", "loss_all", "acc_all",
            "restricted_loss_train", "restricted_loss_all", "restricted_acc_all",
            "excluded_loss_train", "excluded_loss_all", "excluded_acc_train",
            "embed_norms", "unembed_norms", "logit_amplitudes")


@dataclass(frozen=True)
class Grid:
    """The ``n²`` group pairs: ``tokens`` ``(n², 4)``, answer index ``z`` and ``labels`` (answer token)
    ``(n²,)``, ``is_train`` ``(n²,)`` (the pair was in the run's training split)."""
    group: Group
    tokens: np.ndarray
    z: np.ndarray
    labels: np.ndarray
    is_train: np.ndarray


def build_grid(group: Group, tokens: np.ndarray, labels: np.ndarray, train_tokens: np.ndarray) -> Grid:
    """The group grid, matched to the dataset ``tokens``/``labels`` (``data.modular_arithmetic``) and to
    the training split's rows ``train_tokens`` by the pair ``(a, b)``."""
    p, n = group.p, group.n
    position = np.full(p * p, -1, dtype=np.int64)  # dataset row of the pair a·p + b
    position[tokens[:, 0].astype(np.int64) * p + tokens[:, 2]] = np.arange(len(tokens))
    i, j = (m.ravel() for m in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    pairs = group.residue_of[i] * p + group.residue_of[j]  # (n²,) the pair a·p + b
    rows = position[pairs]
    assert (rows >= 0).all(), "the dataset lacks a group pair"
    z = group.combine(i, j)
    assert (labels[rows] == group.residue_of[z]).all(), "group index order disagrees with the dataset labels"
    trained = np.zeros(p * p, dtype=bool)
    trained[train_tokens[:, 0].astype(np.int64) * p + train_tokens[:, 2]] = True
    return Grid(group, tokens[rows], z, labels[rows].astype(np.int64), trained[pairs])


def weight_measures(params: dict, group: Group) -> dict:
    """Fourier norms and Gini coefficients of the embedding and read-out rows of the group's residues
    (in group index order), and the total sum of squared weights. ``params``: name -> NumPy array."""
    for name in (EMBEDDING, UNEMBEDDING):
        if name not in params:
            raise ValueError(f"snapshot has no parameter {name!r}")
    embed_const, embed = fourier.frequency_norms(params[EMBEDDING][group.residue_of].astype(np.float64), group.n)
    _, unembed = fourier.frequency_norms(params[UNEMBEDDING][group.residue_of].astype(np.float64), group.n)
    return dict(sum_sq_weights=float(sum((v.astype(np.float64) ** 2).sum() for v in params.values())),
                embed_gini=fourier.gini(embed), unembed_gini=fourier.gini(unembed),
                embed_constant_norm=embed_const, embed_norms=embed, unembed_norms=unembed)


def logit_measures(logits: np.ndarray, grid: Grid, key_freqs) -> dict:
    """Losses of the logits ``(n², V)`` over the grid, as they are, restricted to the key frequencies and
    with them excluded, on the training pairs and on all pairs; and the per-frequency logit amplitudes.

    Restricted (Nanda et al. 2023): each output column keeps only its projection onto the constant and
    ``cos``/``sin(2πk·z/n)``, ``k`` in ``key_freqs`` (``z`` = the answer's group index, as functions of the
    pair). Excluded: those ``cos``/``sin`` directions removed, everything else kept. Losses are over the
    model's whole output vocabulary, as in training.
    """
    n, z, train = grid.group.n, grid.z, grid.is_train
    logits = logits.astype(np.float64)
    means = fourier.answer_means(logits, z, n)  # (n, V)
    restricted = fourier.project_answer_frequencies(means, z, n, key_freqs, constant=True)
    excluded = logits - fourier.project_answer_frequencies(means, z, n, key_freqs, constant=False)
    out = {}
    for name, x in (("", logits), ("restricted_", restricted), ("excluded_", excluded)):
        loss, correct = fourier.token_losses(x, grid.labels)
        out[f"{name}loss_train"], out[f"{name}acc_train"] = mean(loss[train]), mean(correct[train])
        out[f"{name}loss_all"], out[f"{name}acc_all"] = mean(loss), mean(correct)
    del out["restricted_acc_train"], out["excluded_acc_all"]
    out["logit_amplitudes"] = fourier.answer_frequency_amplitudes(means[:, grid.group.residue_of])
    return out


def mean(x: np.ndarray) -> float | None:
    """The mean as a float; None for an empty array (no training pair in the grid)."""
    return float(x.mean()) if len(x) else None


def snapshot_row(epoch, step, params: dict, logits: np.ndarray, grid: Grid, key_freqs) -> dict:
    """One row of analysis.jsonl (keys ``ROW_KEYS``; arrays as lists)."""
    row = dict(epoch=epoch, step=step) | weight_measures(params, grid.group) | logit_measures(logits, grid, key_freqs)
    assert set(row) == set(ROW_KEYS), set(row) ^ set(ROW_KEYS)
    return {k: (row[k].tolist() if isinstance(row[k], np.ndarray) else row[k]) for k in ROW_KEYS}
