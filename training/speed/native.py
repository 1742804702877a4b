"""Native MLX primitives (``native.cpp``), forward and backward: attention over a few positions, the SiLU gate,
RMSNorm, the cross-entropy loss.

On this backend MLX computes each of these as many small passes and graph nodes, forward and backward:

- attention (``mx.fast.scaled_dot_product_attention``'s fallback): batched matmuls that are ``B x H`` BLAS calls of
  a 4 x d by d x 4 product each, with the transposes into and out of the ``(B, H, L, d)`` layout, the scaling, the
  mask and the softmax as passes of their own. The primitives compute each (row, head) pair's dot products,
  softmax and weighted sum in one loop, on arrays in the ``(B, L, H, d)`` layout the projections give, with the
  keys and values of a prefix cache read in place beside the new ones;
- the SiLU gate: ``kernels.silu_gate``'s operations, which MLX's fusion splits into five loops at the sigmoid's
  bit casts, in one loop each way, giving the same bits;
- RMSNorm (``mx.fast.rms_norm``'s fallback, its definition as ops): one pass per row each way;
- the rotary embedding (``kernels.rope``): MLX fuses it into one kernel, but on its strided path (broadcast tables,
  a negative-stride view); the primitive is a contiguous loop, forward and (the inverse rotation) backward;
- the cross-entropy loss (``nn.losses.cross_entropy``'s logsumexp, and its softmax backward): MLX's CPU exp is a
  scalar loop calling the C library's ``fmaf``; the primitive's exponential is vectorized.

The extension is built once per machine (``compiler.build_library``, the same ``g++`` and flags as the other
native code) against the installed MLX's headers and library and the nanobind it was built with, and imported
once per process. Without a compiler or nanobind, or where it does not load, :func:`load_extension` gives
None and the model keeps MLX's computation.
"""
import functools
import importlib.util
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import mlx.core as mx

from training.speed.compiler import build_library

SOURCE = Path(__file__).with_name("native.cpp")
MODULE = "_native"  # the name NB_MODULE gives it in native.cpp
HEADERS = (Path(__file__).with_name("cpu_primitive.h"),)  # included by the sources, so part of their builds' cache keys


def build_options() -> Optional[tuple]:
    """``(options, identity)`` for ``build_library``: nanobind's combined source and headers, MLX's headers and
    library, Python's headers, and as identity their versions and the text of the layer's own headers; None without
    nanobind."""
    try:
        import nanobind
    except ImportError:
        return None
    mlx_root = Path(mx.__file__).parent  # .../site-packages/mlx (mlx.core is its extension module)
    nb_root = Path(nanobind.include_dir()).parent
    options = ("-std=c++20", "-fvisibility=hidden", "-fno-strict-aliasing",
               "-DNB_DOMAIN=mlx",  # the domain MLX's bindings register mx.array in
               f"-I{nanobind.include_dir()}", f"-I{nb_root / 'ext' / 'robin_map' / 'include'}",
               f"-I{mlx_root / 'include'}", f"-I{sysconfig.get_paths()['include']}",
               str(Path(nanobind.source_dir()) / "nb_combined.cpp"),
               f"-L{mlx_root / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_root / 'lib'}")
    return options, (mx.__version__, nanobind.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "",
                     *(header.read_text() for header in HEADERS))


def import_extension(source: Path, name: str, probe: Callable[[ModuleType], bool]) -> Optional[ModuleType]:
    """The nanobind module ``name`` that ``source`` defines, built (once per machine) and imported, or None where it
    does not build or load, or ``probe(module)`` is false. The probe makes one call with MLX arrays: a nanobind
    whose ABI differs from MLX's loads, but does not know mx.array (a TypeError)."""
    options = build_options()
    path = options and build_library(source, options=options[0], identity=options[1])
    if not path:
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module if probe(module) else None
    except (ImportError, OSError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[ModuleType]:
    """``native.cpp`` built (once per machine) and imported (once per process), or None."""
    def probe(module) -> bool:
        one = mx.zeros((1, 1, 1, 1))
        module.attention(one, [one], [one], 1.0)
        return True
    return import_extension(SOURCE, MODULE, probe)


@functools.lru_cache(maxsize=None)
def _trainable(scale: float):
    """One-part attention with its vector-Jacobian product, for ``scale``."""
    native = load_extension()

    @mx.custom_function
    def attend(q, k, v):
        return tuple(native.attention(q, [k], [v], scale))  # (output, probabilities)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v = primals
        return tuple(native.attention_backward(q, k, v, outputs[1], cotangents[0], scale))

    return attend


@functools.lru_cache(maxsize=None)
def _gate(scale: float, masked: bool):
    """The SiLU gate with its vector-Jacobian product, for ``scale``, with or without a mask."""
    native = load_extension()

    @mx.custom_function
    def gate(a, b, *keep):
        return native.silu_gate(a, b, keep[0] if masked else None, scale)

    @gate.vjp
    def gate_vjp(primals, cotangent, output):
        a, b, *keep = primals
        da, db = native.silu_gate_backward(a, b, keep[0] if masked else None, cotangent, scale)
        return (da, db, *(mx.zeros_like(k) for k in keep))

    return gate


def silu_gate(a: mx.array, b: mx.array, keep: Optional[mx.array] = None, scale: float = 1.0) -> mx.array:
    """``kernels.silu_gate``'s first output (``silu(a) * keep * scale * b``; without ``keep``, ``silu(a) * b``),
    the same bits, forward and backward, in one native pass each; needs :func:`load_extension`."""
    if keep is None:
        return _gate(1.0, False)(a, b)
    return _gate(float(scale), True)(a, b, keep)


@functools.lru_cache(maxsize=None)
def _norm(eps: float):
    """RMSNorm with its vector-Jacobian product, for ``eps``."""
    native = load_extension()

    @mx.custom_function
    def norm(x, weight):
        return native.rms_norm(x, weight, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        x, weight = primals
        return tuple(native.rms_norm_backward(x, weight, cotangent, eps))

    return norm


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``mx.fast.rms_norm(x, weight, eps)`` to float rounding, in one native pass each way; needs
    :func:`load_extension`."""
    return _norm(float(eps))(x, weight)


@functools.lru_cache(maxsize=None)
def _rope():
    """The rotary embedding with its vector-Jacobian product (the inverse rotation; none for the tables)."""
    native = load_extension()

    @mx.custom_function
    def rotate(x, C, S):
        return native.rope(x, C, S, False)

    @rotate.vjp
    def rotate_vjp(primals, cotangent, output):
        x, C, S = primals
        return native.rope(cotangent, C, S, True), mx.zeros_like(C), mx.zeros_like(S)

    return rotate


def rope(x: mx.array, C: mx.array, S: mx.array) -> mx.array:
    """``kernels.rope(x, C, S)`` to float rounding for float32 ``x`` ``(B, L, H, D)`` and tables ``(L, 1, 2, D/2)``,
    forward and backward, in one native pass each; needs :func:`load_extension`."""
    return _rope()(x, C, S)


@functools.lru_cache(maxsize=None)
def _cross_entropy():
    """The per-row cross-entropy with its vector-Jacobian product (none for the targets)."""
    native = load_extension()

    @mx.custom_function
    def loss(logits, targets):
        return native.cross_entropy(logits, targets)

    @loss.vjp
    def loss_vjp(primals, cotangent, output):
        logits, targets = primals
        return native.cross_entropy_backward(logits, targets, cotangent), mx.zeros_like(targets)

    return loss


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """``nn.losses.cross_entropy(logits, targets)`` (per row: ``logsumexp(logits) - logits[target]``) to float
    rounding for float32 ``(N, V)`` logits and int32 ``(N,)`` targets, forward and backward; NaN for a target outside
    ``[0, V)``; needs :func:`load_extension`."""
    return _cross_entropy()(logits, targets)


def attention(queries: mx.array, keys: Sequence[mx.array], values: Sequence[mx.array], scale: float,
              rows: Optional[mx.array] = None) -> mx.array:
    """Causal attention of ``queries`` ``(B, Lq, H, d)`` over the keys and values ``(B, Lk_i, H, d)``, given in
    parts along the sequence (a prefix cache, then the new positions): query ``i`` sees the keys up to position
    ``i + Lk - Lq``; ``rows`` ``(B,)``: row ``b`` of the first parts is their row ``rows[b]`` (read in place, not
    gathered). The output is ``(B, Lq, H, d)``. Differentiable with one part and no ``rows``; needs
    :func:`load_extension`."""
    if len(keys) == 1 and rows is None:
        return _trainable(float(scale))(queries, keys[0], values[0])[0]
    return load_extension().attention(queries, list(keys), list(values), float(scale), rows)[0]
