"""QUAD's preconditioner fit and momentum as native MLX primitives (``quad_fit.cpp``): :func:`quad_iteration`, a
drop-in for ``optimizers.quad.quad_iteration`` on stacks of factored tensors in float32 or float64, and
:func:`momentum_update`, ``optimizers.quad.momentum_update``'s bits.

MLX runs the fit of one parameter group as about 70 graph nodes (the matrix products, and a dozen element-wise
passes and reductions per factor); the primitive is one node, which loops over the stack's slices, calls the
process's BLAS for the products (``syrk`` for the symmetric ones) and does the rest between them. MLX fuses the
momentum into one kernel, but runs it on its strided path (the per-slice factors are broadcast operands); the
primitive is a contiguous loop per slice. Built once
per machine like ``speed.native``; where it does not build or load, or no CBLAS is in the global scope (fastblas
loaded none), :func:`load_extension` gives None and :func:`quad_iteration` is the plain one.
"""
import functools
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

import mlx.core as mx

from optimizers.quad import momentum_update as plain_momentum_update, quad_iteration as plain_iteration
from training.speed.native import import_extension

SOURCE = Path(__file__).with_name("quad_fit.cpp")
MODULE = "_quad_fit"  # the name NB_MODULE gives it in quad_fit.cpp


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[ModuleType]:
    """``quad_fit.cpp`` built (once per machine) and imported (once per process), or None (also without a CBLAS)."""
    def probe(module) -> bool:
        if not module.available():
            return False
        one = mx.ones((1,))
        module.quad_fit(mx.ones((1, 1, 1)), one[None], one[None], one, one, one, one, one, mx.array([True]),
                        0.5, 0.5, 1.0, 1.0)
        return True
    return import_extension(SOURCE, MODULE, probe)


def install(optimizer) -> bool:
    """Give a QUAD ``optimizer`` the native fit and momentum (before its step is traced); False, and the optimizer
    as it was, where they do not build."""
    if load_extension() is None:
        return False
    optimizer.quad_iteration, optimizer.momentum_update = quad_iteration, momentum_update
    return True


def per_slice(x, slices: int, dtype: mx.Dtype) -> mx.array:
    """A scalar or per-slice value as a (slices,) array of ``dtype``."""
    x = x.astype(dtype) if isinstance(x, mx.array) else mx.array(x, dtype)
    return mx.broadcast_to(x.reshape(-1) if x.ndim else x, (slices,))


def quad_iteration(Q: List[mx.array], L: List[mx.array], G: mx.array, diag: Tuple[bool, ...], precond_lr: float,
                   precond_beta: float, scales=(1.0, 1.0), gate=True, numel: int = 1,
                   constants: Optional[dict] = None, scale_pg=None):
    """``optimizers.quad.quad_iteration``, its arguments and results, to rounding: by the native primitive for a
    stack of factored tensors ``G`` (S, m, n) in float32 or float64 on the CPU, else the plain function."""
    native = load_extension()
    if native is None or len(diag) != 2 or G.dtype not in (mx.float32, mx.float64) or mx.default_device() != mx.cpu:
        return plain_iteration(Q, L, G, diag, precond_lr, precond_beta, scales, gate, numel, constants, scale_pg)
    S, m, n = G.shape
    dtype = G.dtype
    Pg, Q_left, Q_right, L_left, L_right = native.quad_fit(
        G, Q[0], Q[1], L[0], L[1], per_slice(scales[0], S, dtype), per_slice(scales[1], S, dtype),
        per_slice(1.0 if scale_pg is None else scale_pg, S, dtype), per_slice(gate, S, mx.bool_),
        float(precond_lr), float(precond_beta), numel / m, numel / n)
    return Pg, [Q_left, Q_right], [L_left, L_right]


def momentum_update(M: mx.array, G: mx.array, weight: mx.array, norm: Optional[mx.array] = None) -> mx.array:
    """``optimizers.quad.momentum_update``, the same bits: by the native primitive for float32 or float64 stacks on
    the CPU, else the plain function."""
    native = load_extension()
    if native is None or M.dtype not in (mx.float32, mx.float64) or mx.default_device() != mx.cpu:
        return plain_momentum_update(M, G, weight, norm)
    return native.momentum_update(M, G, weight, norm)
