"""Dropout masks drawn by native code: the same bits as ``mx.random.bernoulli``, about 6x faster.

MLX's CPU backend hashes the counters behind ``mx.random.bits`` one pair at a time, which made the dropout
masks about 9 % of a training step's CPU time. ``masks.cpp`` restates the hash and MLX's layout of the
counters as a loop that the compiler vectorizes; built once per machine (``compiler.build_library``) and
called through ctypes on a thread of its own, which runs beside the step (ctypes releases the GIL).

The keys come from ``mx.random.state`` exactly as ``mx.random.bernoulli`` takes them (a split per draw, the
state advanced), so the masks, the state after them, and so every result and checkpoint, are the same as
with MLX's own draws.
"""
import ctypes
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from training.speed.compiler import build_library

SOURCE = Path(__file__).with_name("masks.cpp")
# bernoulli compares float32(bits) with float32(p) * upper, upper the float32 just above UINT32_MAX
# (mlx/random.cpp): p >= 1 keeps every element.
UPPER = np.nextafter(np.float32(2 ** 32 - 1), np.float32(np.inf), dtype=np.float32)
WORD_LIMIT = 2 ** 32  # MLX's counters are 32-bit


@functools.lru_cache(maxsize=None)
def load_library() -> Optional[ctypes.CDLL]:
    """``masks.cpp`` built (once per machine) and loaded (once per process), or None."""
    path = build_library(SOURCE)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


class NativeMasks:
    """``draw(p, shapes)``: the masks ``[mx.random.bernoulli(p, shape) for shape in shapes]`` would give, from
    the library built from ``masks.cpp``."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        library.random_bits.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p]
        library.random_bits.restype = None
        library.bernoulli.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_float,
                                      ctypes.c_void_p]
        library.bernoulli.restype = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropout-masks")

    @classmethod
    def build(cls) -> Optional["NativeMasks"]:
        """A generator, from the library built for this machine if need be; None where no compiler builds it or
        the library cannot be loaded (a temporary directory mounted noexec)."""
        library = load_library()
        return None if library is None else cls(library)

    def bits(self, key: np.ndarray, n: int) -> np.ndarray:
        """``mx.random.bits((n,), key=key)`` as a NumPy array."""
        out = np.empty(n, np.uint32)
        self.library.random_bits(int(key[0]), int(key[1]), n, out.ctypes.data)
        return out

    def next_key(self) -> np.ndarray:
        """The key the next ``mx.random`` draw would use, with ``mx.random.state`` advanced past it, as
        ``mx.random.split`` of the state does: the state's bits ``(2, 2)``, the new state first. (The state is
        set through ``seed``, which sets the key ``(s >> 32, s & 0xffffffff)``: it has no setter.)"""
        words = self.bits(np.asarray(mx.random.state[0], dtype=np.uint32), 4)
        mx.random.seed((int(words[0]) << 32) | int(words[1]))
        return words[2:]

    def bernoulli(self, key: np.ndarray, p: float, shape: Tuple[int, ...]) -> np.ndarray:
        """``mx.random.bernoulli(p, shape, key=key)`` as a NumPy bool array."""
        out = np.empty(shape, np.bool_)
        threshold = np.float32(p) * UPPER  # in float32, as MLX multiplies
        self.library.bernoulli(int(key[0]), int(key[1]), out.size, float(threshold), out.ctypes.data)
        return out

    def draw(self, p: float, shapes: Sequence[Tuple[int, ...]]) -> Callable[[], List[mx.array]]:
        """Start drawing the masks on the worker thread (the keys are taken now, in order); the returned call
        waits for them and gives them as arrays."""
        if any(math.prod(shape) >= WORD_LIMIT for shape in shapes):
            raise ValueError(f"dropout mask shapes {list(shapes)}: each must have fewer than 2**32 elements")
        keys = [self.next_key() for _ in shapes]
        pending = [self.worker.submit(self.bernoulli, key, p, shape) for key, shape in zip(keys, shapes)]
        return lambda: [mx.array(mask.result()) for mask in pending]
