"""The plain ``models.Transformer``'s forward pass, computed with less work (same parameters, same logits
to float rounding):

- only the last position is read out, so the last block computes queries, the attention output and the
  MLP for that position alone (keys and values still cover every position);
- the first block's q/k/v are looked up per token: its input is the token's embedding, so they are rows
  of ``attn_norm(embedding.weight) @ W.T``, one per vocabulary entry rather than one per position;
- the dropout masks are drawn before the forward pass (``dropout_masks``), so that a batch can be split
  and still use the whole batch's masks;
- every linear layer's weight gradient is computed laid out like the weight (``kernels.linear``), so that the
  element-wise passes over it (the halves' sum, the optimizer's update) run on MLX's contiguous path;
- queries and keys are rotated by one fused kernel (``kernels.rope``), their features reordered so that the
  rotated pairs are read with unit strides (the same dot products, up to the order of the sum), with the
  rotation's tables computed once;
- evaluation rows share few distinct prefixes (``a op`` of ``a op b =``): their keys and values are
  computed once per prefix (``prefix_keys_values``, ``logits_after``);
- the loss (``loss_and_correct``) by the native cross-entropy, whose exponential is vectorized.
"""
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

import models
from training.speed.native import attention as native_attention, cross_entropy as native_cross_entropy, load_extension
from training.speed.native import rms_norm as native_rms_norm, rope as native_rotary, silu_gate as native_silu_gate
from training.speed.kernels import fast_sigmoid, gather_rows, linear, permute_rows, rope, rope_order, rope_tables
from training.speed.kernels import silu_gate
from training.trainer import loss_and_correct


ROPE_POSITIONS = 64  # positions whose rotary tables are computed ahead (longer sequences compute theirs)


def mlx_linear(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` as ``nn.Linear`` computes it, with MLX's gradient (see ``kernels.linear``)."""
    return x @ w.T


def query_key_projections(attn: models.Attention, fused_rope: bool, dense=mlx_linear) -> tuple:
    """``(wq, wk)`` of ``attn`` as functions of ``x``, computed by ``dense(x, weight)``; with ``fused_rope``, their
    output features in ``kernels.rope_order`` (the weights' rows reordered), which :func:`rotate` with tables
    expects."""
    if not fused_rope:
        return tuple((lambda x, w=w: dense(x, w.weight)) for w in (attn.wq, attn.wk))
    order, inverse = rope_order(attn.rope.dims, attn.heads)
    return tuple((lambda x, w=w: dense(x, permute_rows(w.weight, order, inverse))) for w in (attn.wq, attn.wk))


def rotate(attn: models.Attention, t: mx.array, start: int, tables: Optional[tuple], rotation=rope) -> mx.array:
    """Queries or keys ``t`` ``(B, L, D)`` of positions ``start ..`` as heads ``(B, L, H, D/H)``, rotated by
    ``rotation(t, C, S)`` (``kernels.rope`` or ``speed.native.rope``) with ``tables`` (``kernels.rope_tables`` of
    positions ``0 ..``; ``t`` from :func:`query_key_projections`), or by ``attn.rope`` if None."""
    B, L, _ = t.shape
    t = t.reshape(B, L, attn.heads, -1)
    if tables is None:
        return attn.rope(t.transpose(0, 2, 1, 3), offset=start).transpose(0, 2, 1, 3)
    C, S = tables if start + L <= len(tables[0]) else rope_tables(attn.rope, start + L)
    return rotation(t, C[start:start + L], S[start:start + L])


def attend(queries: mx.array, keys: list, values: list, scale: float, native: bool,
           rows: Optional[mx.array] = None) -> mx.array:
    """Causal attention of ``queries`` ``(B, Lq, H, d)`` over keys and values ``(B, Lk_i, H, d)`` in parts along
    the sequence, query ``i`` seeing the keys up to ``i + Lk - Lq`` (see ``speed.native.attention``, also for ``rows``);
    ``native``: by the native primitives, else by MLX's ``scaled_dot_product_attention``."""
    if native:
        return native_attention(queries, keys, values, scale, rows)
    if rows is not None:
        keys, values = [keys[0][rows], *keys[1:]], [values[0][rows], *values[1:]]
    heads_first = [mx.concatenate(parts, axis=1).transpose(0, 2, 1, 3) if len(parts) > 1 else
                   parts[0].transpose(0, 2, 1, 3) for parts in (keys, values)]
    Lq, Lk = queries.shape[1], heads_first[0].shape[2]
    if Lq == 1:
        mask = None  # the last query attends to every key
    elif Lq == Lk:
        mask = "causal"
    else:
        mask = mx.arange(Lk)[None] <= mx.arange(Lk - Lq, Lk)[:, None]
    out = mx.fast.scaled_dot_product_attention(queries.transpose(0, 2, 1, 3), *heads_first, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3)


def attention(attn: models.Attention, x: Optional[mx.array], last_only: bool = False,
              past: Optional[tuple] = None, return_kv: bool = False, qkv: Optional[tuple] = None,
              tables: Optional[tuple] = None, native: bool = False, past_rows: Optional[mx.array] = None,
              dense=mlx_linear, rotation=rope):
    """``attn`` over ``x`` ``(B, L, D)``, after ``past`` = ``(keys, values)`` ``(B, P, H, D/H)`` of the ``P``
    positions before it when given (with ``past_rows`` ``(B,)``: ``past`` ``(U, P, H, D/H)``, of which row ``b`` of
    ``x`` follows row ``past_rows[b]``); ``last_only``: queries and output for the last position only;
    ``return_kv``: also this call's keys and values; ``qkv``: the projections of ``x`` already computed
    (queries and keys as :func:`query_key_projections` makes them; then ``x`` is not used); ``tables``: the
    rotary embedding's for ``kernels.rope`` (None: ``attn.rope``), see :func:`rotate`; ``native``: see
    :func:`attend`; ``dense(x, weight)``: the linear layers; ``rotation``: see :func:`rotate`."""
    B, L, D = (x if qkv is None else qkv[0]).shape
    wq, wk = query_key_projections(attn, tables is not None, dense)
    project = (lambda i, w: w(x)) if qkv is None else (lambda i, w: qkv[i])
    offset = 0 if past is None else past[0].shape[1]
    new_keys = rotate(attn, project(1, wk), offset, tables, rotation)
    new_values = project(2, lambda x: dense(x, attn.wv.weight)).reshape(B, L, attn.heads, -1)
    if last_only:
        queries = rotate(attn, wq(x[:, -1:]) if qkv is None else qkv[0][:, -1:], offset + L - 1, tables, rotation)
    else:
        queries = rotate(attn, project(0, wq), offset, tables, rotation)
    keys, values = ([new_keys], [new_values]) if past is None else ([past[0], new_keys], [past[1], new_values])
    out = attend(queries, keys, values, (D // attn.heads) ** -0.5, native, past_rows)
    out = dense(out.reshape(B, queries.shape[1], D), attn.wo.weight)
    return (out, (new_keys, new_values)) if return_kv else out


class FastModel:
    """The forward pass of ``model`` with the tricks above; ``fused``: the fused SiLU-gate kernels;
    ``fused_rope``: the fused rotary embedding; ``native_attention``, ``native_gate``, ``native_norm``,
    ``native_rope``: the native attention, SiLU-gate (with ``fused``), RMSNorm, rotary-embedding (with
    ``fused_rope``) and (``native_loss``) cross-entropy primitives (``speed.native``),
    where they build (all rather than MLX's); ``row_major_weight_gradients``: the linear layers by
    ``kernels.linear`` (rather than MLX's)."""

    def __init__(self, model: models.Transformer, cfg: models.ModelConfig, fused: bool = True,
                 lookup_first_qkv: bool = True, fused_rope: bool = True, native_attention: bool = True,
                 native_gate: bool = True, native_norm: bool = True, native_loss: bool = True,
                 native_rope: bool = True, row_major_weight_gradients: bool = True):
        self.model = model
        self.dense = linear if row_major_weight_gradients else mlx_linear
        built = load_extension() is not None
        self.native_attention, self.native_norm = native_attention and built, native_norm and built
        self.native_loss = native_loss and built
        self.native_gate = native_gate and fused and built  # the fused gate, in native code
        self.rotation = native_rotary if native_rope and fused_rope and built else rope  # kernels.rope's, natively
        self.keep_prob = 1 - cfg.dropout  # dropout on the SiLU branch, as nn.Dropout(cfg.dropout)
        self.fused = fused
        self.fused_rope = fused_rope
        self.lookup_first_qkv = lookup_first_qkv and cfg.depth > 1
        # Computed once, outside any compiled graph (in it, their dozen small ops would run every step).
        self.rope_tables = {id(block): rope_tables(block.attn.rope, ROPE_POSITIONS) if fused_rope else None
                            for block in model.blocks}
        mx.eval(list(self.rope_tables.values()))

    def loss_and_correct(self, logits: mx.array, y: mx.array):
        """``training.trainer.loss_and_correct``: the summed cross-entropy (native with ``native_loss``, to float
        rounding) and the number of correct predictions."""
        if not self.native_loss:
            return loss_and_correct(logits, y)
        return mx.sum(native_cross_entropy(logits, y.astype(mx.int32))), mx.sum(mx.argmax(logits, axis=1) == y)

    def tables_of(self, block: models.Block) -> Optional[tuple]:
        """The rotary embedding's tables of ``block`` (None: MLX's RoPE)."""
        return self.rope_tables[id(block)]

    def norm(self, norm: nn.RMSNorm, x: mx.array) -> mx.array:
        """``norm(x)``."""
        return native_rms_norm(x, norm.weight, norm.eps) if self.native_norm else norm(x)

    def feed_forward(self, ff: models.FeedForward, x: mx.array, keep: Optional[mx.array]) -> mx.array:
        """``ff(x)`` with the dropout mask ``keep`` (None: no dropout)."""
        a, b = self.dense(x, ff.w1.weight), self.dense(x, ff.w3.weight)  # (..., mlp_dim)
        if self.native_gate:
            h = native_silu_gate(a, b, keep, 1 / self.keep_prob)
        elif not self.fused:
            h = (nn.silu(a) if keep is None else (keep * nn.silu(a)) * (1 / self.keep_prob)) * b  # as nn.Dropout
        elif keep is None:
            h = a * fast_sigmoid(a) * b
        else:
            h = silu_gate(a, b, keep, mx.array(1 / self.keep_prob))[0]
        return self.dense(h, ff.w2.weight)

    def block(self, block: models.Block, x: mx.array, last_only: bool = False, keep: Optional[mx.array] = None,
              past: Optional[tuple] = None, qkv: Optional[tuple] = None,
              past_rows: Optional[mx.array] = None) -> mx.array:
        """``block(x)``; ``qkv``: the attention's projections of ``attn_norm(x)``, already computed; ``past``,
        ``past_rows``: see :func:`attention`."""
        h = attention(block.attn, self.norm(block.attn_norm, x) if qkv is None else None, last_only, past, qkv=qkv,
                      tables=self.tables_of(block), native=self.native_attention, past_rows=past_rows,
                      dense=self.dense, rotation=self.rotation)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.feed_forward(block.ff, self.norm(block.ff_norm, x), keep)

    def __call__(self, tokens: mx.array, masks: Optional[list] = None) -> mx.array:
        """Logits ``(B, V)`` for the token after ``tokens`` ``(B, L)``, with the dropout ``masks`` from
        :meth:`dropout_masks` (rows may be sliced with the batch; None: no dropout)."""
        blocks = self.model.blocks
        masks = masks or [None] * len(blocks)
        x = self.model.embedding(tokens)  # (B, L, D)
        qkv = self.first_qkv(tokens) if self.lookup_first_qkv else None
        for block, keep in zip(blocks[:-1], masks):
            x, qkv = self.block(block, x, keep=keep, qkv=qkv), None
        x = self.block(blocks[-1], x, last_only=True, keep=masks[-1])[:, 0]  # (B, D)
        return self.dense(self.norm(self.model.norm, x), self.model.out.weight)

    def first_qkv(self, tokens: mx.array) -> tuple:
        """The first block's ``wq, wk, wv`` of ``attn_norm(embedding(tokens))``, each ``(B, L, D)`` (queries and
        keys as :func:`query_key_projections` makes them), looked up per token; their gradient reaches the
        tables through ``gather_rows``."""
        block = self.model.blocks[0]
        attn, table = block.attn, self.norm(block.attn_norm, self.model.embedding.weight)  # (V, D)
        wq, wk = query_key_projections(attn, self.fused_rope, self.dense)
        table = mx.concatenate([wq(table), wk(table), self.dense(table, attn.wv.weight)], axis=-1)  # (V, 3D)
        return tuple(mx.split(gather_rows(table, tokens), 3, axis=-1))

    def dropout_shapes(self, batch_size: int, length: int) -> Optional[list]:
        """The shapes of :meth:`dropout_masks`; None in eval mode or without dropout."""
        if not self.model.training or self.keep_prob == 1:
            return None
        shapes = [(batch_size, length, ff.w1.weight.shape[0]) for ff in (b.ff for b in self.model.blocks)]
        shapes[-1] = (batch_size, 1, shapes[-1][2])
        return shapes

    def dropout_masks(self, batch_size: int, length: int) -> Optional[list]:
        """The dropout masks (keep where True) of a training pass over ``(batch_size, length)`` tokens, one
        per block (the last block's for the last position only); None in eval mode or without dropout."""
        shapes = self.dropout_shapes(batch_size, length)
        return shapes and [mx.random.bernoulli(self.keep_prob, shape) for shape in shapes]

    def prefix_keys_values(self, prefixes: mx.array) -> list:
        """Each block's attention ``(keys, values)`` ``(U, P, H, D/H)`` for the ``U`` sequences ``prefixes``
        ``(U, P)`` (eval mode: no dropout). See :meth:`logits_after`."""
        blocks = self.model.blocks
        x = self.model.embedding(prefixes)
        cache = []
        for block in blocks:
            h, kv = attention(block.attn, self.norm(block.attn_norm, x), return_kv=True, tables=self.tables_of(block),
                              native=self.native_attention, dense=self.dense, rotation=self.rotation)
            cache.append(kv)
            if block is not blocks[-1]:
                x = x + h
                x = x + self.feed_forward(block.ff, self.norm(block.ff_norm, x), None)
        return cache

    def logits_after(self, tokens: mx.array, past: list, rows: Optional[mx.array] = None) -> mx.array:
        """``self(concatenate([prefix, tokens], 1))`` in eval mode, from the prefix's keys and values ``past``
        (from :meth:`prefix_keys_values`, one row per row of ``tokens``; with ``rows``, one per prefix, row ``b``
        of ``tokens`` following prefix ``rows[b]``)."""
        blocks = self.model.blocks
        x = self.model.embedding(tokens)
        qkv = self.first_qkv(tokens) if self.lookup_first_qkv else None
        for block, kv in zip(blocks[:-1], past):
            x, qkv = self.block(block, x, past=kv, qkv=qkv, past_rows=rows), None
        x = self.block(blocks[-1], x, last_only=True, past=past[-1], past_rows=rows)[:, 0]
        return self.dense(self.norm(self.model.norm, x), self.model.out.weight)
