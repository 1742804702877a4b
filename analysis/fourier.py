"""Fourier maths over ``Z_n``, all in NumPy: the basis, per-frequency norms, the Gini coefficient, the
key-frequency rule, and the logit projections of Nanda et al. (2023), "Progress measures for grokking via
mechanistic interpretability".

Basis convention (``fourier_basis(n)``, rows orthonormal, ``F @ F.T = I``): row 0 is the constant
``1/√n``; then for each frequency ``k = 1..⌈n/2⌉−1`` the pair ``√(2/n)·cos(2πkx/n)``, ``√(2/n)·sin(2πkx/n)``;
for even ``n`` a last row ``(−1)^x/√n``, the cosine at the Nyquist frequency ``k = n/2`` (its sine is 0).
Frequencies are the integers ``k = 1..n//2``; ``k`` means the angular frequency ``2πk/n``.
"""
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def fourier_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(F, freq)``: the orthonormal real Fourier basis of ``Z_n`` as rows ``(n, n)``, and each row's
    frequency ``(n,)`` (0 for the constant). Cached: the arrays are read-only."""
    x = np.arange(n)
    rows, freq = [np.full(n, 1 / np.sqrt(n))], [0]
    for k in range(1, (n + 1) // 2):
        angle = 2 * np.pi * k * x / n
        rows += [np.sqrt(2 / n) * np.cos(angle), np.sqrt(2 / n) * np.sin(angle)]
        freq += [k, k]
    if n % 2 == 0 and n > 1:
        rows.append((-1.0) ** x / np.sqrt(n))
        freq.append(n // 2)
    F, freq = np.stack(rows), np.array(freq)
    F.setflags(write=False), freq.setflags(write=False)
    return F, freq


def frequency_norms(weights: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """Fourier norms of ``weights`` ``(n, D)``, whose rows are in group index order: ``(constant, norms)``
    with ``norms[k−1]`` the Frobenius norm of the frequency-``k`` rows of ``F @ weights``, ``k = 1..n//2``."""
    F, freq = fourier_basis(n)
    energy = ((F @ weights) ** 2).sum(axis=1)  # (n,) per basis row
    per_freq = np.bincount(freq, weights=energy, minlength=n // 2 + 1)
    return float(np.sqrt(per_freq[0])), np.sqrt(per_freq[1:])


def gini(values: np.ndarray) -> float:
    """The Gini coefficient of non-negative ``values``: mean absolute difference over twice the mean.

    0 for a flat vector, ``(K−1)/K`` when one of ``K`` entries holds everything (0 for an all-zero vector).
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    total, K = v.sum(), len(v)
    if K == 0 or total == 0:
        return 0.0
    # Σ_i Σ_j |v_i − v_j| = 2 Σ_i (2i − K + 1) v_(i) for v sorted ascending, i = 0..K−1
    return float(2 * ((2 * np.arange(K) - K + 1) * v).sum() / (2 * K * total))


def key_frequencies(norms: np.ndarray, factor: float, max_key: int) -> tuple[list[int], float]:
    """The key-frequency rule: the frequencies whose norm exceeds ``factor`` times the median norm over all
    frequencies (``norms[k−1]`` belongs to ``k``) and 1e-6 times the largest, the largest first, at most
    ``max_key``.

    A trained embedding has a few peaks over a flat floor of leftovers, and the median sits on the floor
    (while fewer than half the frequencies are peaks); a spectrum with no peaks (an untrained model)
    gives none. Returns the frequencies, ascending, and their share of the total squared norm.
    """
    norms = np.asarray(norms, dtype=np.float64)
    total = (norms ** 2).sum()
    if total == 0:
        return [], 0.0
    order = np.argsort(-norms, kind="stable")
    # (the second bound ignores rounding noise when the floor is exactly 0)
    floor = max(factor * np.median(norms), 1e-6 * norms.max())
    chosen = [int(k) for k in order[:max_key] if norms[k] > floor]
    return sorted(k + 1 for k in chosen), float((norms[chosen] ** 2).sum() / total)


def answer_means(logits: np.ndarray, z: np.ndarray, n: int) -> np.ndarray:
    """``M[z', c]``: the mean of ``logits[:, c]`` over the pairs whose answer has index ``z'`` ``(n, C)``.

    ``logits`` ``(n², C)`` covers the whole group grid, so every answer index occurs exactly ``n`` times.
    """
    order = np.argsort(z, kind="stable")
    assert (z[order] == np.repeat(np.arange(n), n)).all(), "z must take every value n times"
    return logits[order].reshape(n, n, -1).mean(axis=1)


def project_answer_frequencies(means: np.ndarray, z: np.ndarray, n: int, freqs, constant: bool) -> np.ndarray:
    """The orthogonal projection of each column of the logits ``(n², C)`` (functions of the pair over the
    whole grid) onto the span of ``cos(2πk·z/n)``, ``sin(2πk·z/n)`` for ``k`` in ``freqs``, with ``z`` the
    pair's answer index, plus the constant when ``constant``; from their per-answer ``means``
    (``answer_means``, ``(n, C)``).

    Those functions depend on the pair only through ``z``, which takes each value ``n`` times on the
    grid, so the projection is that of the per-answer means onto the same rows of the 1-D basis.
    """
    F, freq = fourier_basis(n)
    rows = (np.isin(freq, list(freqs)) & (freq > 0)) | ((freq == 0) & constant)
    Fk = F[rows]  # (m, n)
    return (Fk.T @ (Fk @ means))[z]  # (n², C)


def answer_frequency_amplitudes(means: np.ndarray) -> np.ndarray:
    """``A[k−1]``, ``k = 1..n//2``: the amplitude of the logits' wave ``A_k cos(2πk(z − c)/n − φ_k)``: the
    component of the logits ``(n², n)`` (columns: the answers in group index order, ``c``) along the two
    directions ``cos(2πk(z − c)/n)``, ``sin(2πk(z − c)/n)`` over the whole grid of pairs × answers, from
    their per-answer ``means`` ``(n, n)`` ``[z, c]`` (``answer_means``).

    For logits ``Σ_k α_k cos(2πk(z − c)/n)`` (the Fourier algorithm), ``A_k = |α_k|``.
    """
    n = len(means)
    T = np.fft.fft2(means)  # T[u, v] = Σ M[z, c] e^{−2πi(uz + vc)/n}; the wave at k is T[k, −k]
    k = np.arange(1, n // 2 + 1)
    scale = np.where(2 * k == n, 1.0, 2.0) / n ** 2  # the Nyquist wave has no sine, and cos² ≡ 1
    return np.abs(T[k, (-k) % n]) * scale


def token_losses(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy ``(B,)`` (float64) and whether the top logit is the label ``(B,)``."""
    x = logits.astype(np.float64, copy=False)
    top = x.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return logsumexp - x[np.arange(len(labels)), labels], x.argmax(axis=1) == labels
