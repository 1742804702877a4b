"""Modular arithmetic data: every pair ``(a, b)`` of ``a ∘ b mod p`` as tokens ``[a, op, b, =]``."""
import os
from dataclasses import dataclass

import numpy as np

OPERATIONS = ("+", "-", "*", "/")
BYTES_PER_EXAMPLE = 100  # the peak while the dataset is built (int64 pairs, labels, tokens) and split


def memory_bytes() -> int:
    """This machine's physical memory (16 GiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


@dataclass(frozen=True)
class DataConfig:
    p: int = 97
    op: str = "/"
    train_fraction: float = 0.5

    def __post_init__(self):
        if self.op not in OPERATIONS:
            raise ValueError(f"data.op={self.op!r} is not supported; choose from {list(OPERATIONS)}")
        if self.p < 2:
            raise ValueError(f"data.p={self.p} must be >= 2")
        if self.op == "/" and not is_prime(self.p):
            raise ValueError(f"data.p={self.p} must be prime for op '/' (division uses Fermat's little theorem)")
        need, have = self.num_examples * BYTES_PER_EXAMPLE, memory_bytes()
        if need > have // 2:
            raise ValueError(f"data.p={self.p} makes {self.num_examples:,} examples, about {need / 2**30:.1f} GiB to "
                             f"build; this machine has {have / 2**30:.1f} GiB (at most {have // 2 // BYTES_PER_EXAMPLE:,} "
                             f"examples)")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"data.train_fraction={self.train_fraction} must be in (0, 1)")
        n_train = int(self.train_fraction * self.num_examples)
        if n_train == 0:
            raise ValueError(f"data.train_fraction={self.train_fraction} leaves an empty split "
                             f"({n_train} of {self.num_examples} examples for training)")

    @property
    def vocab_size(self) -> int:
        """Residues ``0..p-1``, then the operation token ``p`` and ``=`` as ``p + 1``."""
        return self.p + 2

    @property
    def num_examples(self) -> int:
        return self.p * (self.p - 1 if self.op == "/" else self.p)


def modular_arithmetic(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """All examples: tokens ``(N, 4)`` int32 and labels ``(N,)`` int32, ``a``-major order."""
    p = cfg.p
    b_values = np.arange(1 if cfg.op == "/" else 0, p, dtype=np.int64)
    a, b = np.meshgrid(np.arange(p, dtype=np.int64), b_values, indexing="ij")
    a, b = a.ravel(), b.ravel()
    if cfg.op == "+":
        labels = (a + b) % p
    elif cfg.op == "-":
        labels = (a - b) % p
    elif cfg.op == "*":
        labels = (a * b) % p
    else:  # a / b = a * b^(p-2) mod p (Fermat); int64 holds (p-1)^2 for any p < 3e9
        labels = (a * modular_power(b, p - 2, p)) % p
    tokens = np.stack([a, np.full_like(a, p), b, np.full_like(a, p + 1)], axis=1)
    return tokens.astype(np.int32), labels.astype(np.int32)


def modular_power(base: np.ndarray, exponent: int, modulus: int) -> np.ndarray:
    """Elementwise ``base ** exponent % modulus`` by square-and-multiply (vectorised)."""
    result = np.ones_like(base)
    base = base % modulus
    while exponent:
        if exponent & 1:
            result = result * base % modulus
        base = base * base % modulus
        exponent >>= 1
    return result


def split(cfg: DataConfig, rng: np.random.Generator):
    """A seeded train/validation split: ``(x_train, y_train, x_val, y_val)`` as numpy arrays."""
    tokens, labels = modular_arithmetic(cfg)
    n_train = int(cfg.train_fraction * len(tokens))
    order = rng.permutation(len(tokens))
    train, val = order[:n_train], order[n_train:]
    return tokens[train], labels[train], tokens[val], labels[val]
