"""A helper the native-code tests share (importable as ``numerics``: pytest puts this folder on the path)."""
import numpy as np


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest reference magnitude (absolute where that is 0: a
    query with one key has no gradient)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() or 1.0))
