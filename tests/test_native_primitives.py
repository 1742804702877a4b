"""The native primitives (``training/speed/native.cpp``). The SiLU gate: ``kernels.silu_gate``'s bits, forward and
backward, masked and not, strided inputs, one-line errors. RMSNorm: ``mx.fast.rms_norm`` to float rounding, forward
and backward, strided inputs, one-line errors. The rotary embedding: ``kernels.rope``'s bits, forward and backward,
at the model's tables' positions, strided inputs (the looked-up queries' column slices), one-line errors. The
cross-entropy loss: ``nn.losses.cross_entropy`` to float
rounding, forward and backward, over class counts that are and are not multiples of the lanes, NaN for a NaN logit
or a target outside the classes, one-line errors. Attention, against MLX's
``scaled_dot_product_attention``: forward and vector-Jacobian product over head counts, lengths, head sizes that
are and are not multiples of the kernel's lanes, strided inputs, key parts and prefix rows read in place;
compiled as eager; the fast model and trainer with them as without; one-line errors; the fallback without
nanobind; the benchmark's one-line error for an unknown kind."""
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import data
from config import Config, override
from models import ModelConfig, Transformer
from numerics import rel_err
from training.speed import kernels, native
from training.speed.model import FastModel, attend
from training.speed.trainer import FastTrainer

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                               reason="the primitives are built with g++ on Linux"),
              pytest.mark.usefixtures("cpu_stream")]


@pytest.fixture(scope="module")
def extension():
    module = native.load_extension()
    assert module is not None, "nanobind is in requirements.txt: the extension should build here"
    return module


def assert_one_line_error(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def heads_last(*shape, seed=0):
    """A random ``(B, L, H, d)`` array."""
    return mx.random.normal(shape, key=mx.random.key(seed))


def mlx_attention(q, k, v, scale):
    """MLX's attention of ``(B, L, H, d)`` arrays, query ``i`` seeing keys ``<= i + Lk - Lq``."""
    return attend(q, [k], [v], scale, native=False)


SHAPES = [  # (B, Lq, Lk, H, d)
    (7, 4, 4, 1, 128), (5, 4, 4, 4, 32), (3, 1, 4, 2, 16), (6, 3, 3, 3, 24), (2, 2, 5, 1, 7), (4, 1, 1, 2, 130)]


@pytest.mark.parametrize("B,Lq,Lk,H,d", SHAPES)
def test_forward_equals_mlxs_attention(extension, B, Lq, Lk, H, d):
    q, k, v = heads_last(B, Lq, H, d, seed=1), heads_last(B, Lk, H, d, seed=2), heads_last(B, Lk, H, d, seed=3)
    scale = d ** -0.5
    assert rel_err(native.attention(q, [k], [v], scale), mlx_attention(q, k, v, scale)) <= 1e-6


@pytest.mark.parametrize("B,Lq,Lk,H,d", SHAPES)
def test_vjp_equals_mlxs(extension, B, Lq, Lk, H, d):
    q, k, v = heads_last(B, Lq, H, d, seed=1), heads_last(B, Lk, H, d, seed=2), heads_last(B, Lk, H, d, seed=3)
    g = heads_last(B, Lq, H, d, seed=4)
    scale = d ** -0.5

    def grads(f):
        return mx.grad(lambda q, k, v: (f(q, k, v, scale) * g).sum(), argnums=(0, 1, 2))(q, k, v)

    for ours, theirs in zip(grads(lambda *a: native.attention(a[0], [a[1]], [a[2]], a[3])), grads(mlx_attention)):
        assert rel_err(ours, theirs) <= 2e-6


def test_compiled_equals_eager_to_the_bit(extension):
    q, k, v, g = (heads_last(6, 4, 2, 32, seed=s) for s in range(4))

    def loss(q, k, v):
        return (native.attention(q, [k], [v], 0.25) * g).sum()

    step = mx.value_and_grad(loss, argnums=(0, 1, 2))
    eager, compiled = step(q, k, v), mx.compile(step)(q, k, v)
    assert np.array_equal(eager[0], compiled[0])
    assert all(np.array_equal(a, b) for a, b in zip(eager[1], compiled[1]))


def test_strided_inputs_are_read_in_place(extension):
    # (B, H, L, d) arrays seen as (B, L, H, d): strided rows; a sliced d: stride 1 along d but rows apart.
    q, k, v = (heads_last(5, 3, 4, 40, seed=s).transpose(0, 2, 1, 3)[..., :33] for s in range(3))
    contiguous = [mx.array(np.asarray(a)) for a in (q, k, v)]
    assert np.array_equal(native.attention(q, [k], [v], 0.3), native.attention(*contiguous[:1], [contiguous[1]],
                                                                                [contiguous[2]], 0.3))
    # A stride other than 1 along d is copied first.
    qt = heads_last(5, 4, 3, 40, seed=7).transpose(0, 3, 2, 1)[:, :3, :, :4]  # d strided
    kt = heads_last(5, 4, 3, 40, seed=8).transpose(0, 3, 2, 1)[:, :3, :, :4]
    assert rel_err(native.attention(qt, [kt], [kt], 0.5), mlx_attention(qt, kt, kt, 0.5)) <= 1e-6


@pytest.mark.parametrize("splits", [(1, 3), (2, 2), (3, 1), (1, 1, 2)])
def test_key_parts_equal_their_concatenation(extension, splits):
    q, k, v = heads_last(6, 2, 2, 16, seed=1), heads_last(6, 4, 2, 16, seed=2), heads_last(6, 4, 2, 16, seed=3)
    bounds = np.cumsum((0,) + splits)
    parts = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    whole = native.attention(q, [k], [v], 0.25)
    split = native.attention(q, [k[:, s] for s in parts], [v[:, s] for s in parts], 0.25)
    assert np.array_equal(whole, split)
    assert rel_err(split, mlx_attention(q, k, v, 0.25)) <= 1e-6


def test_prefix_rows_read_in_place_equal_the_gathered_prefixes(extension):
    table_k, table_v = heads_last(3, 2, 2, 16, seed=1), heads_last(3, 2, 2, 16, seed=2)  # 3 prefixes of 2
    rows = mx.array([2, 0, 0, 1, 2, 1, 1])
    q, k, v = heads_last(7, 2, 2, 16, seed=3), heads_last(7, 2, 2, 16, seed=4), heads_last(7, 2, 2, 16, seed=5)
    indexed = native.attention(q, [table_k, k], [table_v, v], 0.25, rows)
    gathered = native.attention(q, [table_k[rows], k], [table_v[rows], v], 0.25)
    assert np.array_equal(indexed, gathered)
    reference = attend(q, [table_k, k], [table_v, v], 0.25, native=False, rows=rows)
    assert rel_err(indexed, reference) <= 1e-6


@pytest.mark.parametrize("call, message", [
    (lambda e: e.attention(mx.zeros((2, 4, 1, 8), mx.float16), [mx.zeros((2, 4, 1, 8))], [mx.zeros((2, 4, 1, 8))],
                           1.0), "float32"),
    (lambda e: e.attention(mx.zeros((2, 4, 1, 8)), [mx.zeros((2, 4, 1, 8))], [], 1.0), "same number of parts"),
    (lambda e: e.attention(mx.zeros((2, 4, 1, 8)), [mx.zeros((3, 4, 1, 8))], [mx.zeros((3, 4, 1, 8))], 1.0),
     "(B, _, H, d)"),
    (lambda e: e.attention(mx.zeros((2, 5, 1, 8)), [mx.zeros((2, 4, 1, 8))], [mx.zeros((2, 4, 1, 8))], 1.0),
     "more queries than keys"),
    (lambda e: e.attention(mx.zeros((2, 4, 1, 8)), [mx.zeros((2, 4, 1, 8))], [mx.zeros((2, 3, 1, 8))], 1.0),
     "each key part needs its values"),
    (lambda e: e.attention(mx.zeros((2, 1, 1, 8)), [mx.zeros((3, 2, 1, 8))], [mx.zeros((3, 2, 1, 8))], 1.0,
                           mx.array([0, 1, 2])), "rows must be a (B,) array"),
    (lambda e: e.attention(mx.zeros((2, 1, 1, 8)), [mx.zeros((3, 2, 1, 8))], [mx.zeros((2, 2, 1, 8))], 1.0,
                           mx.array([0, 1])), "the same rows"),
])
def test_bad_input_gets_a_one_line_error(extension, call, message):
    assert_one_line_error(lambda: call(extension), message)


@pytest.mark.parametrize("row", [3, -1])
def test_a_row_outside_the_prefix_cache_is_a_one_line_error_not_a_read_out_of_bounds(extension, row):
    q, cache = mx.ones((2, 1, 1, 8)), mx.ones((3, 2, 1, 8))
    out, _ = extension.attention(q, [cache, mx.ones((2, 1, 1, 8))], [cache, mx.ones((2, 1, 1, 8))], 1.0,
                                 mx.array([0, row]))
    with pytest.raises(RuntimeError) as error:  # known once evaluated; MLX raises the task's error
        mx.eval(out)
    message = str(error.value)
    assert f"rows[1] = {row} must name one of the 3 rows" in message and "\n" not in message
    good, _ = extension.attention(q, [cache, mx.ones((2, 1, 1, 8))], [cache, mx.ones((2, 1, 1, 8))], 1.0,
                                  mx.array([0, 2]))
    assert mx.allclose(good, mx.ones((2, 1, 1, 8))).item()  # the stream works on after the error


def model_and_tokens(dim=32, heads=2, depth=3, rows=16):
    cfg = ModelConfig(dim=dim, depth=depth, heads=heads, dropout=0.0)
    model = Transformer(cfg, vocab_size=13)
    mx.eval(model.parameters())
    tokens = mx.array(np.random.default_rng(0).integers(0, 13, size=(rows, 4)))
    return cfg, model, tokens


def test_fast_model_with_native_primitives_equals_it_without(extension):
    cfg, model, tokens = model_and_tokens()
    with_native = FastModel(model, cfg)
    without = FastModel(model, cfg, native_attention=False, native_gate=False, native_norm=False, native_loss=False,
                        native_rope=False)
    flags = ("native_attention", "native_gate", "native_norm", "native_loss")
    assert all(getattr(with_native, flag) for flag in flags) and not any(getattr(without, flag) for flag in flags)
    assert with_native.rotation is native.rope and without.rotation is kernels.rope
    assert rel_err(with_native(tokens), without(tokens)) <= 1e-5
    logits, labels = with_native(tokens), mx.array(np.arange(16) % 13)
    (loss, correct), (mlx_loss, mlx_correct) = with_native.loss_and_correct(logits, labels), \
        without.loss_and_correct(logits, labels)
    assert abs(loss.item() - mlx_loss.item()) <= 1e-6 * mlx_loss.item() and correct.item() == mlx_correct.item()
    past_native, past_mlx = with_native.prefix_keys_values(tokens[:5, :2]), without.prefix_keys_values(tokens[:5, :2])
    rows = mx.array(np.arange(16) % 5)
    assert rel_err(with_native.logits_after(tokens[:, 2:], past_native, rows),
                   without.logits_after(tokens[:, 2:], past_mlx, rows)) <= 1e-5


def test_a_trainer_with_native_primitives_follows_one_without(extension):
    cfg = override(Config(), {"data.p": 11, "model.dim": 32, "model.heads": 2, "train.batch_size": 32})
    tokens, labels = data.modular_arithmetic(cfg.data)
    x, y = mx.array(tokens[:64]), mx.array(labels[:64])
    params = {}
    for use in (True, False):
        mx.random.seed(0)
        trainer = FastTrainer(cfg)
        for flag in ("native_attention", "native_gate", "native_norm", "native_loss"):
            assert getattr(trainer.fast, flag)
            setattr(trainer.fast, flag, use)  # read when the step is first traced
        assert trainer.fast.rotation is native.rope
        trainer.fast.rotation = native.rope if use else kernels.rope
        for _ in range(3):
            trainer.step(x, y)
        mx.eval(trainer.model.parameters())
        params[use] = dict(tree_flatten(trainer.model.parameters()))
    for name, value in params[True].items():
        assert rel_err(value, params[False][name]) <= 1e-4, name


def test_without_nanobind_the_model_keeps_mlxs_computation(monkeypatch):
    monkeypatch.setattr(native, "build_options", lambda: None)
    native.load_extension.cache_clear()
    try:
        cfg, model, tokens = model_and_tokens()
        fast = FastModel(model, cfg)
        assert not (fast.native_attention or fast.native_gate or fast.native_norm or fast.native_loss)
        assert fast.rotation is kernels.rope
        assert rel_err(fast(tokens), model(tokens)) <= 1e-5
    finally:
        native.load_extension.cache_clear()


# The SiLU gate: kernels.silu_gate's bits, forward and backward.

def gate_inputs(shape, seed=0):
    keys = mx.random.split(mx.random.key(seed), 4)
    a = mx.random.normal(shape, key=keys[0]) * 8  # past the polynomial's clipped range too
    return a, mx.random.normal(shape, key=keys[1]), mx.random.bernoulli(0.8, shape, key=keys[2]), \
        mx.random.normal(shape, key=keys[3])


def mlx_gate(a, b, keep, scale):
    if keep is None:
        return a * kernels.fast_sigmoid(a) * b
    return kernels.silu_gate(a, b, keep, mx.array(scale))[0]


@pytest.mark.parametrize("shape", [(3, 4, 64), (5, 1, 37), (1,), (2, 3, 4, 5)])
@pytest.mark.parametrize("masked", [True, False])
def test_gate_forward_and_vjp_are_mlxs_fused_gates_bits(extension, shape, masked):
    a, b, keep, g = gate_inputs(shape)
    keep = keep if masked else None

    def forward_and_grads(gate):
        def loss(a, b):
            return (gate(a, b, keep, 1.25) * g).sum()
        return mx.compile(lambda a, b: (gate(a, b, keep, 1.25), *mx.grad(loss, argnums=(0, 1))(a, b)))(a, b)

    ours, theirs = forward_and_grads(native.silu_gate), forward_and_grads(mlx_gate)
    assert np.array_equal(ours[0], theirs[0])
    if masked:  # the unmasked MLX gate differentiates fast_sigmoid's vjp: the same to rounding
        assert all(np.array_equal(x, y) for x, y in zip(ours[1:], theirs[1:]))
    assert all(rel_err(x, y) <= 1e-6 for x, y in zip(ours[1:], theirs[1:]))
    silu = a * mx.sigmoid(a)
    assert rel_err(ours[0], silu * b if keep is None else silu * keep * 1.25 * b) <= 1e-6


def test_gate_reads_strided_inputs(extension):
    a, b, keep, g = gate_inputs((6, 4, 8))
    at, bt, kt = a.transpose(2, 0, 1), b.transpose(2, 0, 1), keep.transpose(2, 0, 1)
    assert np.array_equal(native.silu_gate(at, bt, kt, 1.25), native.silu_gate(a, b, keep, 1.25).transpose(2, 0, 1))


@pytest.mark.parametrize("call, message", [
    (lambda e: e.silu_gate(mx.zeros((2, 3)), mx.zeros((2, 4)), None, 1.0), "shape of a"),
    (lambda e: e.silu_gate(mx.zeros((2, 3)), mx.zeros((2, 3), mx.float16), None, 1.0), "float32"),
    (lambda e: e.silu_gate(mx.zeros((2, 3)), mx.zeros((2, 3)), mx.zeros((2, 3)), 1.0), "mask must be bool"),
])
def test_gate_bad_input_gets_a_one_line_error(extension, call, message):
    assert_one_line_error(lambda: call(extension), message)


# RMSNorm: mx.fast.rms_norm to float rounding, forward and backward.

@pytest.mark.parametrize("shape", [(7, 4, 128), (3, 1, 32), (5, 37), (2, 3, 4, 16), (1, 1)])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_rms_norm_and_its_vjp_equal_mlxs(extension, shape, eps):
    keys = mx.random.split(mx.random.key(1), 3)
    x, g = mx.random.normal(shape, key=keys[0]) * 3, mx.random.normal(shape, key=keys[1])
    w = mx.random.normal(shape[-1:], key=keys[2])

    def forward_and_grads(norm):
        return mx.compile(mx.value_and_grad(lambda x, w: (norm(x, w, eps) * g).sum(), argnums=(0, 1)))(x, w)

    (ours, (dx, dw)), (theirs, (tx, tw)) = forward_and_grads(native.rms_norm), forward_and_grads(mx.fast.rms_norm)
    assert rel_err(native.rms_norm(x, w, eps), mx.fast.rms_norm(x, w, eps)) <= 1e-6
    assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
    assert rel_err(dx, tx) <= 2e-6 and rel_err(dw, tw) <= 2e-6


def test_rms_norm_reads_strided_inputs(extension):
    x, w = mx.random.normal((8, 6, 16), key=mx.random.key(2)), mx.random.normal((16,), key=mx.random.key(3))
    xt = x.transpose(1, 0, 2)
    assert np.array_equal(native.rms_norm(xt, w, 1e-5), native.rms_norm(x, w, 1e-5).transpose(1, 0, 2))


@pytest.mark.parametrize("call, message", [
    (lambda e: e.rms_norm(mx.zeros((2, 3)), mx.zeros((4,)), 1e-5), "as long as x's last axis"),
    (lambda e: e.rms_norm(mx.zeros((2, 3), mx.float16), mx.zeros((3,)), 1e-5), "float32"),
    (lambda e: e.rms_norm_backward(mx.zeros((2, 3)), mx.zeros((3,)), mx.zeros((3, 3)), 1e-5), "shaped as x"),
])
def test_rms_norm_bad_input_gets_a_one_line_error(extension, call, message):
    assert_one_line_error(lambda: call(extension), message)


# The rotary embedding: kernels.rope's bits, forward and backward.

@pytest.mark.parametrize("shape", [(5, 4, 4, 32), (3, 1, 2, 64), (2, 7, 1, 6), (1, 3, 3, 2)])
@pytest.mark.parametrize("start", [0, 3])
def test_rope_and_its_vjp_are_kernels_ropes_bits(extension, shape, start):
    B, L, H, D = shape
    C, S = kernels.rope_tables(nn.RoPE(D), start + L)
    C, S = C[start:], S[start:]  # the rows rotate() passes: a view
    x = mx.random.normal(shape, key=mx.random.key(1))
    cotangent = mx.random.normal(shape, key=mx.random.key(2))
    assert np.array_equal(native.rope(x, C, S), kernels.rope(x, C, S))
    (_,), (grad,) = mx.vjp(lambda x: native.rope(x, C, S), [x], [cotangent])
    (_,), (reference,) = mx.vjp(lambda x: kernels.rope(x, C, S), [x], [cotangent])
    assert np.array_equal(grad, reference)


def test_rope_reads_strided_inputs(extension):
    C, S = kernels.rope_tables(nn.RoPE(16), 4)
    looked_up = mx.random.normal((3, 4, 3 * 32), key=mx.random.key(3))  # first_qkv's (B, L, 3D), D = 2 heads x 16
    keys = mx.split(looked_up, 3, axis=-1)[1].reshape(3, 4, 2, 16)  # a column slice: unit stride, rows of 96
    transposed = mx.random.normal((3, 4, 16, 2), key=mx.random.key(4)).transpose(0, 1, 3, 2)  # features strided
    for x in (keys, transposed):
        assert np.array_equal(native.rope(x, C, S), kernels.rope(x, C, S))


@pytest.mark.parametrize("call, message", [
    (lambda e: e.rope(mx.zeros((2, 4, 1, 8), mx.float16), mx.zeros((4, 1, 2, 4)), mx.zeros((4, 1, 2, 4)), False),
     "rope's x must be a float32 (B, L, H, D) array with D even, not a float16 (2, 4, 1, 8) array"),
    (lambda e: e.rope(mx.zeros((2, 4, 1, 7)), mx.zeros((4, 1, 2, 3)), mx.zeros((4, 1, 2, 3)), False),
     "with D even, not a float32 (2, 4, 1, 7) array"),
    (lambda e: e.rope(mx.zeros((2, 4, 1, 8)), mx.zeros((3, 1, 2, 4)), mx.zeros((4, 1, 2, 4)), False),
     "rope's tables must be float32 (L, 1, 2, D / 2) arrays for x's L and D, not a float32 (3, 1, 2, 4) array"),
    (lambda e: e.rope(mx.zeros((2, 4, 1, 8)), mx.zeros((4, 1, 2, 4)), mx.zeros((4, 2, 4)), True),
     "not a float32 (4, 2, 4) array"),
])
def test_rope_bad_input_gets_a_one_line_error(extension, call, message):
    assert_one_line_error(lambda: call(extension), message)


# The cross-entropy loss: nn.losses.cross_entropy to float rounding, forward and backward.

@pytest.mark.parametrize("N,V", [(7, 99), (300, 99), (5, 16), (4, 33), (3, 1), (2, 15)])
def test_cross_entropy_and_its_vjp_equal_mlxs(extension, N, V):
    keys = mx.random.split(mx.random.key(4), 3)
    logits = mx.random.normal((N, V), key=keys[0]) * 6  # confident rows too: some losses near 0
    targets = mx.random.randint(0, V, (N,), key=keys[1]).astype(mx.int32)
    g = mx.random.normal((N,), key=keys[2])

    def forward_and_grad(loss):
        return mx.compile(mx.value_and_grad(lambda x: (loss(x, targets) * g).sum()))(logits)

    (ours, dx), (theirs, tx) = forward_and_grad(native.cross_entropy), forward_and_grad(nn.losses.cross_entropy)
    per_row, reference = native.cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets)
    assert np.allclose(per_row, reference, rtol=1e-6, atol=1e-6)  # atol: x[target] - max rounds in both
    assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, float(np.abs(np.array(reference)).sum()))
    assert rel_err(dx, tx) <= 2e-6
    probabilities = np.array(mx.softmax(logits, axis=1))
    one_hot = np.eye(V, dtype=np.float32)[np.array(targets)]
    assert rel_err(dx, (probabilities - one_hot) * np.array(g)[:, None]) <= 2e-6


def test_cross_entropys_exponential_is_accurate_over_the_float_range(extension):
    # Two logits (t, 0), target 0: the gradient's first entry is sigmoid(t) - 1 and the loss log(1 + e^-t), here
    # for t from -87 (past which e^t is below float's normal range) to 0, against float64.
    t = mx.linspace(-87, 0, 200001)
    logits, targets = mx.stack([t, mx.zeros_like(t)], axis=1), mx.ones(t.shape, mx.int32)
    grad = mx.grad(lambda x: native.cross_entropy(x, targets).sum())(logits)
    exact = 1 / (1 + np.exp(-np.array(t, dtype=np.float64)))
    assert np.max(np.abs(np.array(grad[:, 0], dtype=np.float64) - exact) / exact) <= 16 * 2.0 ** -24
    assert np.allclose(native.cross_entropy(logits, targets), np.log1p(np.exp(np.array(t, np.float64))),
                       rtol=2e-7, atol=1e-7)


def test_cross_entropy_of_a_nan_logit_or_a_target_outside_the_classes_is_nan(extension):
    logits = mx.array([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-1e30, 0.0, 1e30]])
    for bad in (3, -1):
        targets = mx.array([0, 2, bad, 2], mx.int32)
        loss = native.cross_entropy(logits, targets)
        grad = mx.grad(lambda x: native.cross_entropy(x, targets).sum())(logits)
        assert np.isnan(loss[0].item()) and np.isnan(loss[2].item())
        assert np.isnan(np.array(grad[0])).all() and np.isnan(np.array(grad[2])).all()
        assert np.allclose(loss[1].item(), nn.losses.cross_entropy(logits[1:2], targets[1:2]).item(), rtol=1e-6)
        assert loss[3].item() == 0.0 and np.array_equal(grad[3], [0.0, 0.0, 0.0])  # large logits, no overflow


def test_cross_entropy_reads_strided_logits(extension):
    logits = mx.random.normal((33, 6), key=mx.random.key(5))
    targets = mx.array(np.arange(6) % 33, mx.int32)
    assert np.array_equal(native.cross_entropy(logits.T, targets), native.cross_entropy(mx.array(np.array(logits.T)),
                                                                                        targets))


@pytest.mark.parametrize("call, message", [
    (lambda e: e.cross_entropy(mx.zeros((2, 3), mx.float16), mx.zeros((2,), mx.int32)), "float16 (2, 3)"),
    (lambda e: e.cross_entropy(mx.zeros((2, 3, 1)), mx.zeros((2,), mx.int32)), "(N, V) array, not a float32"),
    (lambda e: e.cross_entropy(mx.zeros((2, 3)), mx.zeros((2,), mx.uint32)), "not a uint32 (2,) array"),
    (lambda e: e.cross_entropy(mx.zeros((2, 3)), mx.zeros((3,), mx.int32)), "one per row of the logits"),
    (lambda e: e.cross_entropy_backward(mx.zeros((2, 3)), mx.zeros((2,), mx.int32), mx.zeros((2, 3))),
     "shaped as the targets, not a float32 (2, 3) array"),
])
def test_cross_entropy_bad_input_gets_a_one_line_error(extension, call, message):
    assert_one_line_error(lambda: call(extension), message)


def test_the_benchmark_refuses_an_unknown_kind_in_one_line():
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "benchmarks/native_primitives.py", "lost"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "native_primitives.py: error: KIND='lost' must be one of attention, gate, norm, " \
                                  "rope, loss, all, quad"
