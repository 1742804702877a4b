"""A small causal transformer: RoPE attention, RMSNorm, SiLU-gated MLP, read-out from the last token.

This is the plain model, the one to read and change. Training on MLX's Linux CPU backend runs the same
parameters through faster code (``speed/``), tested equal to this.
"""
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

    def split_heads(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D/H)

    def __call__(self, x: mx.array) -> mx.array:
        """Causal self-attention over ``x`` ``(B, L, D)``."""
        B, L, D = x.shape
        queries = self.rope(self.split_heads(self.wq(x)))
        keys = self.rope(self.split_heads(self.wk(x)))
        values = self.split_heads(self.wv(x))
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=(D // self.heads) ** -0.5,
                                                   mask="causal")
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class FeedForward(nn.Module):
    """``w2(dropout(silu(w1 x)) * w3 x)``: dropout on the SiLU branch, as in the original model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def hidden(self, x: mx.array) -> mx.array:
        """The MLP's hidden activations ``(..., mlp_dim)``, the input of ``w2``."""
        return self.dropout(nn.silu(self.w1(x))) * self.w3(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(self.hidden(x))


class Block(nn.Module):
    """Pre-norm residual block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.dim)
        self.ff = FeedForward(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = [Block(cfg) for _ in range(cfg.depth)]
        self.norm = nn.RMSNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, vocab_size, bias=False)

    def residual_stream(self, tokens: mx.array) -> mx.array:
        """The residual stream after the last block, ``(B, L, D)``."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, tokens: mx.array) -> mx.array:
        """Logits ``(B, V)`` for the token after ``tokens`` ``(B, L)`` (read out from the last position)."""
        return self.out(self.norm(self.residual_stream(tokens)[:, -1]))
