"""The cyclic group an operation lives in, and the map from residues to its index order.

``+`` and ``−`` live in ``Z_p`` (index = residue). ``×`` and ``÷`` live in the multiplicative group of the
nonzero residues mod a prime ``p``, which is cyclic of order ``p − 1``: with a primitive root ``g``
(the smallest one, computed), residue ``x = g^i`` gets index ``i = log_g x``, and ``a·b``, ``a/b`` become
``i + j``, ``i − j`` mod ``p − 1``. Residue 0 is outside that group: pairs with ``a = 0`` or ``b = 0`` and
the answer 0 are left out of every group-based measure (``Group.index_of`` is −1 there).
"""
from dataclasses import dataclass

import numpy as np

import data


def prime_factors(n: int) -> list[int]:
    """The distinct prime factors of ``n >= 1``, ascending (trial division)."""
    factors, d = [], 2
    while d * d <= n:
        if n % d == 0:
            factors.append(d)
            while n % d == 0:
                n //= d
        d += 1
    if n > 1:
        factors.append(n)
    return factors


def primitive_root(p: int) -> int:
    """The smallest generator of the multiplicative group mod the prime ``p``.

    ``g`` generates it iff ``g^((p-1)/q) != 1`` for every prime ``q`` dividing ``p − 1``.
    """
    if not data.is_prime(p):
        raise ValueError(f"p={p} is not prime: the nonzero residues mod p form no cyclic group")
    if p == 2:
        return 1
    qs = prime_factors(p - 1)
    for g in range(2, p):
        if all(pow(g, (p - 1) // q, p) != 1 for q in qs):
            return g
    raise AssertionError(f"no primitive root found mod {p}")  # every prime has one


def discrete_log_table(p: int, g: int) -> np.ndarray:
    """``log[x]`` with ``g^log[x] = x mod p`` for ``x = 1..p−1``; ``log[0] = −1`` (0 has no logarithm)."""
    log = np.full(p, -1, dtype=np.int64)
    x = 1
    for i in range(p - 1):
        assert log[x] == -1, f"{g} is not a generator mod {p}"
        log[x] = i
        x = x * g % p
    return log


@dataclass(frozen=True)
class Group:
    """The cyclic group ``Z_n`` an operation mod ``p`` is computed in.

    ``residue_of[i]``: the residue (token) with group index ``i``, ``(n,)``; ``index_of[x]``: the index of
    residue ``x``, ``(p,)``, −1 for a residue outside the group (0 under ×, ÷). ``sign``: the answer's index
    is ``(i + sign · j) mod n`` for ``a`` of index ``i`` and ``b`` of index ``j``.
    """
    name: str
    p: int
    op: str
    n: int
    root: int | None
    residue_of: np.ndarray
    index_of: np.ndarray
    sign: int

    def combine(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The index of ``a ∘ b`` from the indices ``i`` of ``a`` and ``j`` of ``b``."""
        return (i + self.sign * j) % self.n


def build_group(p: int, op: str) -> Group:
    """The group of ``a op b mod p``; ``ValueError`` for an unknown op or a non-prime ``p`` under ×, ÷."""
    if op not in data.OPERATIONS:
        raise ValueError(f"unknown op {op!r}; choose from {list(data.OPERATIONS)}")
    sign = -1 if op in ("-", "/") else 1
    if op in ("+", "-"):
        index = np.arange(p, dtype=np.int64)
        return Group(f"Z_{p}", p, op, p, None, index, index, sign)
    g = primitive_root(p)
    log = discrete_log_table(p, g)
    residue_of = np.empty(p - 1, dtype=np.int64)
    residue_of[log[1:]] = np.arange(1, p)
    return Group(f"(Z_{p})^x = Z_{p - 1} by log base {g}", p, op, p - 1, g, residue_of, log, sign)
