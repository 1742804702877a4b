"""Fused elementwise kernels for MLX's CPU backend outside macOS.

There MLX's exp and sigmoid call the C library's ``fmaf`` for every polynomial step: the SiLU gate of the
first block alone cost more than all its matmuls. ``fast_sigmoid`` is the same Cephes polynomial MLX uses,
written as plain multiply-adds that ``mx.compile`` fuses into a few generated loops, and the gate gets an
explicit backward pass that reuses the forward sigmoid. Both agree with ``nn.silu`` to float32 rounding.
"""
import mlx.core as mx

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
