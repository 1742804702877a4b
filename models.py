"""A small causal transformer: RoPE attention, RMSNorm, SiLU-gated MLP, read-out from the last token."""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import sys
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 128
    depth: int = 2
    heads: int = 1
    dropout: float = 0.2
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * dim

    def __post_init__(self):
        for key in ("dim", "depth", "heads", "mlp_ratio"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.dim


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Embedding and read-out ``2 V D``; per block ``4 D²`` attention, ``3 D H`` MLP, two norms; final norm."""
    d = cfg.dim
    return 2 * vocab_size * d + cfg.depth * (4 * d * d + 3 * d * cfg.mlp_dim + 2 * d) + d


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # base 1e6 and the interleaved ("traditional") layout follow the original MLX grokking model.
        self.rope = nn.RoPE(cfg.dim // cfg.heads, traditional=True, base=1e6)

    def __call__(self, x: mx.array, last_only: bool = False, past: Optional[tuple] = None,
                 return_kv: bool = False, qkv: Optional[tuple] = None):
        """Attention of ``x`` ``(B, L, D)`` over itself, after ``past`` = ``(keys, values)`` ``(B, H, P, D/H)``
        of the ``P`` positions before it when given; with ``return_kv``, also this call's keys and values.
        ``qkv``: ``(wq(x), wk(x), wv(x))`` already computed (then ``x`` is not used)."""
        B, L, D = (x if qkv is None else qkv[0]).shape
        project = (lambda i, w: w(x)) if qkv is None else (lambda i, w: qkv[i])
        offset = 0 if past is None else past[0].shape[2]
        heads = lambda t: t.reshape(B, t.shape[1], self.heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D/H)
        new_keys = self.rope(heads(project(1, self.wk)), offset=offset)
        new_values = heads(project(2, self.wv))
        keys, values = new_keys, new_values
        if past is not None:
            keys, values = mx.concatenate([past[0], keys], axis=2), mx.concatenate([past[1], values], axis=2)
        if last_only:
            # The last query attends to every key, so it needs no mask.
            queries = self.rope(heads(self.wq(x[:, -1:]) if qkv is None else qkv[0][:, -1:]),
                                offset=offset + L - 1)
            mask = None
        else:
            queries = self.rope(heads(project(0, self.wq)), offset=offset)
            mask = "causal" if past is None else mx.arange(offset + L)[None] <= mx.arange(offset, offset + L)[:, None]
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=(D // self.heads) ** -0.5,
                                                   mask=mask)
        out = self.wo(out.transpose(0, 2, 1, 3).reshape(B, queries.shape[2], D))
        return (out, (new_keys, new_values)) if return_kv else out


# ---------------------------------------------------------------------------------------------
# A faster SiLU gate for MLX's CPU backend outside macOS.
#
# There MLX's exp and sigmoid call the C library's ``fmaf`` for every polynomial step (~17 ns per
# element): the SiLU gate of the first block alone cost more than all its matmuls. ``fast_sigmoid``
# is the same Cephes polynomial MLX uses, written as plain multiply-adds that ``mx.compile`` fuses
# into a few generated loops (~10x faster), and the gate gets an explicit backward pass that reuses
# the forward sigmoid. Both agree with ``nn.silu`` to float32 rounding (tests/test_speed_paths.py).
# On macOS (Accelerate) and GPU backends the model uses ``nn.silu`` as before.

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: adding it rounds a float in (-2**22, 2**22) to an integer, in its low bits
_EXPONENT = (127 - 0x4B400000) % 2**32  # maps the bits of (n + _ROUND) to those of 2**n after << 23
_EXP2 = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
         2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # 2**f on [-1/2, 1/2] (Cephes, as in MLX)


def use_fast_cpu_kernels() -> bool:
    """Whether the hand-fused elementwise kernels pay off: MLX's CPU backend outside macOS."""
    return sys.platform != "darwin" and mx.default_device() == mx.cpu


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


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)
        self.keep_prob = 1 - cfg.dropout  # dropout on the SiLU branch, as nn.Dropout(cfg.dropout)

    def draw_mask(self, shape) -> Optional[mx.array]:
        """The dropout mask for hidden activations of ``shape`` (what ``nn.Dropout`` draws), or None."""
        if not self.training or self.keep_prob == 1:
            return None
        return mx.random.bernoulli(self.keep_prob, shape)

    def __call__(self, x: mx.array, keep: Optional[mx.array] = None) -> mx.array:
        """``keep``: the dropout mask to use; drawn here when training and not given."""
        a, b = self.w1(x), self.w3(x)  # (..., mlp_dim)
        if keep is None:
            keep = self.draw_mask(a.shape)
        if not use_fast_cpu_kernels():
            h = nn.silu(a) if keep is None else (keep * nn.silu(a)) * (1 / self.keep_prob)  # as nn.Dropout
            return self.w2(h * b)
        if keep is None:
            return self.w2(a * fast_sigmoid(a) * b)
        return self.w2(silu_gate(a, b, keep, mx.array(1 / self.keep_prob))[0])


class Block(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.dim)
        self.ff = FeedForward(cfg)

    def __call__(self, x: mx.array, last_only: bool = False, keep: Optional[mx.array] = None,
                 past: Optional[tuple] = None, qkv: Optional[tuple] = None) -> mx.array:
        """``qkv``: the attention's projections of ``attn_norm(x)``, already computed (see ``Transformer``)."""
        h = self.attn(self.attn_norm(x) if qkv is None else None, last_only, past, qkv=qkv)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.ff(self.ff_norm(x), keep)


class Transformer(nn.Module):
    lookup_first_qkv = True  # on the fast CPU path, look the first block's q/k/v up per token (first_qkv)

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = [Block(cfg) for _ in range(cfg.depth)]
        self.norm = nn.RMSNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, vocab_size, bias=False)

    def __call__(self, tokens: mx.array, masks: Optional[list] = None) -> mx.array:
        """Logits ``(B, V)`` for the token after ``tokens`` ``(B, L)``.

        ``masks``: dropout masks from :meth:`dropout_masks` (rows may be sliced with the batch); when
        None, a training pass draws the same masks itself.
        """
        masks = masks or [None] * len(self.blocks)
        x = self.embedding(tokens)  # (B, L, D)
        qkv = self.first_qkv(tokens) if self._lookup_first_qkv() else None
        for block, keep in zip(self.blocks[:-1], masks):
            x, qkv = block(x, keep=keep, qkv=qkv), None
        # Only the last position is read out, so the last block computes queries, attention output
        # and MLP for that position alone (keys and values still cover every position).
        x = self.blocks[-1](x, last_only=True, keep=masks[-1])[:, 0]  # (B, D)
        return self.out(self.norm(x))

    def _lookup_first_qkv(self) -> bool:
        return self.lookup_first_qkv and use_fast_cpu_kernels() and len(self.blocks) > 1

    def first_qkv(self, tokens: mx.array) -> tuple:
        """The first block's attention projections ``wq, wk, wv`` of ``attn_norm(embedding(tokens))``, each
        ``(B, L, D)``, looked up per token: the input of the first block is the token's embedding, so
        they are rows of ``attn_norm(embedding.weight) @ W.T`` ``(V, D)``, computed once per vocabulary
        entry rather than once per position (the same products, per row). Their gradient reaches the
        tables through ``gather_rows``."""
        attn, table = self.blocks[0].attn, self.blocks[0].attn_norm(self.embedding.weight)  # (V, D)
        table = mx.concatenate([attn.wq(table), attn.wk(table), attn.wv(table)], axis=-1)  # (V, 3D)
        return tuple(mx.split(gather_rows(table, tokens), 3, axis=-1))

    def dropout_masks(self, batch_size: int, length: int) -> Optional[list]:
        """The dropout masks that a training ``self(tokens)`` on ``(batch_size, length)`` tokens draws,
        in the same order from the same random state (None in eval mode or without dropout).

        Drawing them first lets a caller split the batch and still apply the whole batch's masks.
        """
        shapes = [(batch_size, length, ff.w1.weight.shape[0]) for ff in (b.ff for b in self.blocks)]
        shapes[-1] = (batch_size, 1, shapes[-1][2])  # the last block runs the MLP on the last position only
        masks = [b.ff.draw_mask(shape) for b, shape in zip(self.blocks, shapes)]
        return None if masks[0] is None else masks

    def prefix_keys_values(self, prefixes: mx.array) -> list:
        """Each block's attention ``(keys, values)`` ``(U, H, P, D/H)`` for the ``U`` sequences ``prefixes``
        ``(U, P)``: what any sequence starting with one of them needs from its first ``P`` positions
        (eval mode: no dropout). See :meth:`logits_after`."""
        x = self.embedding(prefixes)
        cache = []
        for block in self.blocks:
            h, kv = block.attn(block.attn_norm(x), return_kv=True)
            cache.append(kv)
            if block is not self.blocks[-1]:
                x = x + h
                x = x + block.ff(block.ff_norm(x))
        return cache

    def logits_after(self, tokens: mx.array, past: list) -> mx.array:
        """``self(concatenate([prefix, tokens], 1))`` in eval mode, from the prefix's keys and values
        ``past`` (from :meth:`prefix_keys_values`, one row per row of ``tokens``).

        Evaluation sets share few distinct prefixes (here ``a op`` of ``a op b =``): their positions
        are computed once per distinct prefix instead of once per row, with the same result.
        """
        x = self.embedding(tokens)
        qkv = self.first_qkv(tokens) if self._lookup_first_qkv() else None
        for block, kv in zip(self.blocks[:-1], past):
            x, qkv = block(x, past=kv, qkv=qkv), None
        x = self.blocks[-1](x, last_only=True, past=past[-1])[:, 0]
        return self.out(self.norm(x))

    def full_forward(self, tokens: mx.array) -> mx.array:
        """Logits ``(B, L, V)`` at every position: the unpruned computation, for tests."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))
