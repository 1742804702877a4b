"""A small causal transformer: RoPE attention, RMSNorm, SiLU-gated MLP, read-out from the last token."""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

from dataclasses import dataclass

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

    def __call__(self, x: mx.array, last_only: bool = False) -> mx.array:
        B, L, D = x.shape
        heads = lambda t: t.reshape(B, t.shape[1], self.heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D/H)
        keys = self.rope(heads(self.wk(x)))
        values = heads(self.wv(x))
        if last_only:
            # The last query attends to every key, so it needs no mask.
            queries = self.rope(heads(self.wq(x[:, -1:])), offset=L - 1)
            mask = None
        else:
            queries = self.rope(heads(self.wq(x)))
            mask = "causal"
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=(D // self.heads) ** -0.5,
                                                   mask=mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, queries.shape[2], D))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(self.dropout(nn.silu(self.w1(x))) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.dim)
        self.ff = FeedForward(cfg)

    def __call__(self, x: mx.array, last_only: bool = False) -> mx.array:
        h = self.attn(self.attn_norm(x), last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.ff(self.ff_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = [Block(cfg) for _ in range(cfg.depth)]
        self.norm = nn.RMSNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, vocab_size, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        """Logits ``(B, V)`` for the token after ``tokens`` ``(B, L)``."""
        x = self.embedding(tokens)  # (B, L, D)
        for block in self.blocks[:-1]:
            x = block(x)
        # Only the last position is read out, so the last block computes queries, attention output
        # and MLP for that position alone (keys and values still cover every position).
        x = self.blocks[-1](x, last_only=True)[:, 0]  # (B, D)
        return self.out(self.norm(x))

    def full_forward(self, tokens: mx.array) -> mx.array:
        """Logits ``(B, L, V)`` at every position: the unpruned computation, for tests."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))
