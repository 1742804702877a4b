"""Fused elementwise kernels for MLX's CPU backend outside macOS.

There MLX's exp and sigmoid call the C library's ``fmaf`` for every polynomial step: the SiLU gate of the
first block alone cost more than all its matmuls. ``fast_sigmoid`` is the same Cephes polynomial MLX uses,
written as plain multiply-adds that ``mx.compile`` fuses into a few generated loops, and the gate gets an
explicit backward pass that reuses the forward sigmoid. Both agree with ``nn.silu`` to float32 rounding.
"""
import math

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding it rounds a float in (-2**22, 2**22) to an integer, in its low bits
_EXPONENT = (127 - 0x4B400000) % 2**32  # maps the bits of (n + _ROUND) to those of 2**n after << 23
_EXP2 = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
         2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # 2**f on [-1/2, 1/2] (Cephes, as in MLX)


@mx.custom_function
def fast_sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + exp(-x))`` with ``exp(-x) = 2**n * 2**f`` from multiply-adds and a bit shift.

    Written without selects: MLX's generated loops branch on them, and a data-dependent branch costs
    more than the arithmetic around it.
    """
    t = mx.clip(x * -_LOG2E, -126.0, 126.0)  # -x log2(e), where 2**n stays a normal float32
    rounded = t + _ROUND  # holds n = round(t) in its low mantissa bits
    two_n = mx.view((mx.view(rounded, mx.uint32) + _EXPONENT) << 23, mx.float32)  # 2**n
    f = t - (rounded - _ROUND)  # [-1/2, 1/2]
    c, f2 = _EXP2, f * f  # Estrin's scheme keeps the expression shallow enough to fuse
    two_f = (c[6] + c[5] * f) + f2 * (c[4] + c[3] * f) + (f2 * f2) * ((c[2] + c[1] * f) + f2 * c[0])
    return 1.0 / (1.0 + two_f * two_n)


@fast_sigmoid.vjp
def _fast_sigmoid_vjp(primals, cotangent, s):
    return cotangent * s * (1.0 - s)


@mx.custom_function
def silu_gate(a: mx.array, b: mx.array, keep: mx.array, scale: mx.array):
    """``(silu(a) * keep * scale * b, sigmoid(a))``: the dropped-out SiLU gate, as ``nn.Dropout`` computes
    it (``keep`` is the boolean mask, ``scale = 1 / (1 - p)``).

    The second output is for the backward pass (it takes no gradient).
    """
    s = fast_sigmoid(a)
    return ((a * s) * keep) * scale * b, s


@silu_gate.vjp
def _silu_gate_vjp(primals, cotangents, outputs):
    a, b, keep, scale = primals
    g, s = cotangents[0], outputs[1]
    # d silu(a) / da = s (1 + a (1 - s)). The two gradients share no intermediate array, so that each
    # compiles to a single fused loop; the mask multiplies (a select on it would branch).
    da = (((g * keep) * scale) * b) * (s * (1.0 + a * (1.0 - s)))
    db = (((g * keep) * scale) * a) * s
    return da, db, mx.zeros_like(keep), mx.zeros_like(scale)


@mx.custom_function
def gather_rows(table: mx.array, indices: mx.array) -> mx.array:
    """``table[indices]``, whose gradient is a matmul with the one-hot rows of ``indices`` rather than
    MLX's scatter-add (one BLAS call on the CPU)."""
    return table[indices]


@gather_rows.vjp
def _gather_rows_vjp(primals, cotangent, output):
    table, indices = primals
    one_hot = (indices.reshape(-1, 1) == mx.arange(table.shape[0])).astype(cotangent.dtype)  # (N, V)
    return one_hot.T @ cotangent.reshape(-1, table.shape[1]), mx.zeros_like(indices)



def rope_order(dims: int, heads: int) -> tuple:
    """``(order, inverse)``: the order of the ``heads * dims`` query / key features in which :func:`rope` rotates
    them, each head's even features, then its odd ones, and its inverse permutation (both constants, made from
    Python lists rather than in the graph). The interleaved ("traditional") layout rotates the pairs
    ``(2i, 2i + 1)``; reordered, each pair is ``(i, dims / 2 + i)``, two halves that the rotation reads with unit
    strides. Queries and keys reordered alike have the same dot products, up to the order of the sum."""
    within = list(range(0, dims, 2)) + list(range(1, dims, 2))
    order = [h * dims + i for h in range(heads) for i in within]
    inverse = [0] * len(order)
    for position, feature in enumerate(order):
        inverse[feature] = position
    return mx.array(order), mx.array(inverse)


@mx.custom_function
def permute_rows(w: mx.array, order: mx.array, inverse: mx.array) -> mx.array:
    """``w[order]`` for a permutation ``order`` (``inverse`` its inverse), whose gradient is the inverse
    permutation of the cotangent (a gather, rather than MLX's scatter-add)."""
    return w[order]


@permute_rows.vjp
def _permute_rows_vjp(primals, cotangent, output):
    w, order, inverse = primals
    return cotangent[inverse], mx.zeros_like(order), mx.zeros_like(inverse)


@mx.custom_function
def linear(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T``, as ``nn.Linear`` without a bias computes it, whose weight gradient is computed as ``g^T x``, laid
    out like the weight. MLX's matmul gives it as the transpose of ``x^T g``, a column-major view, and every
    element-wise pass over it (the sum of a batch's halves, the optimizer's update, with row-major parameters and
    state beside it) then runs on MLX's strided path. Both are the same dot products over the rows of ``x``."""
    return x @ w.T


@linear.vjp
def _linear_vjp(primals, cotangent, output):
    x, w = primals
    rows = cotangent.reshape(-1, cotangent.shape[-1])
    return cotangent @ w, rows.T @ x.reshape(-1, x.shape[-1])


def rope_tables(rope: nn.RoPE, length: int, offset: int = 0) -> tuple:
    """``(C, S)`` ``(length, 1, 2, dims / 2)`` for :func:`rope`: the cosines and signed sines of positions
    ``offset ..``, computed as ``mx.fast.rope`` computes them (its fallback on this backend: the same float32
    ops), for the features in :func:`rope_order`."""
    half = rope.dims // 2
    inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(math.log(rope.base) / half, mx.float32))
    positions = (mx.arange(length, dtype=mx.float32) + offset) * mx.array(rope.scale, mx.float32)
    theta = positions[:, None] * inv_freqs
    cos, sin = mx.cos(theta), mx.sin(theta)
    return mx.stack([cos, cos], axis=1)[:, None], mx.stack([-sin, sin], axis=1)[:, None]


def _rotate(x: mx.array, C: mx.array, S: mx.array) -> mx.array:
    # x * C + (x with its two halves swapped) * S, the swap a view with a negative stride.
    halves = x.reshape(x.shape[:-1] + (2, x.shape[-1] // 2))
    return (halves * C + halves[..., ::-1, :] * S).reshape(x.shape)


@mx.custom_function
def rope(x: mx.array, C: mx.array, S: mx.array) -> mx.array:
    """The rotary embedding of ``x`` ``(B, L, H, dims)``, its features in :func:`rope_order`, with the tables
    of :func:`rope_tables`: ``x1 c - x2 s`` and ``x1 s + x2 c`` for each pair ``(x1, x2)``, rounded as
    ``mx.fast.rope`` rounds them, in one fused pass with unit strides (MLX's fallback on this backend slices
    the interleaved pairs with stride 2 and concatenates them, several passes that cost 3 ms of a 33 ms step).
    The backward pass is the inverse rotation, again one pass."""
    return _rotate(x, C, S)


@rope.vjp
def _rope_vjp(primals, cotangent, output):
    x, C, S = primals
    return _rotate(cotangent, C, -S), mx.zeros_like(C), mx.zeros_like(S)
