import mlx.core as mx
import numpy as np
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from models import ModelConfig, Transformer, parameter_count


def count(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("cfg, vocab", [
    (ModelConfig(), 99),
    (ModelConfig(dim=32, depth=1, heads=4, mlp_ratio=2), 9),
    (ModelConfig(dim=48, depth=3, heads=3, dropout=0.0), 25),
])
def test_parameter_count_matches_formula_and_every_parameter_gets_a_gradient(cfg, vocab):
    mx.random.seed(0)
    model = Transformer(cfg, vocab)
    assert count(model) == parameter_count(cfg, vocab)
    tokens = mx.random.randint(0, vocab, (6, 4))
    loss_grad = nn.value_and_grad(model, lambda m: (m(tokens) ** 2).sum())
    _, grads = loss_grad(model)
    dead = [k for k, g in tree_flatten(grads) if float(mx.abs(g).max()) == 0.0]
    assert dead == []  # no dead layers: every parameter influences the logits


def test_logits_shape_and_dtype():
    model = Transformer(ModelConfig(dim=16, depth=2, heads=2), 13)
    logits = model(mx.zeros((5, 4), dtype=mx.int32))
    assert logits.shape == (5, 13) and logits.dtype == mx.float32


def test_logits_are_the_read_out_of_the_last_position():
    mx.random.seed(1)
    model = Transformer(ModelConfig(dim=32, depth=2, heads=4), 19)
    model.eval()
    tokens = mx.random.randint(0, 19, (8, 4))
    # Equal to rounding, not bit for bit: the read-out's product has 8 rows here and 32 in the reference, and a BLAS
    # may sum a row differently with the matrix's height (OpenBLAS's AVX2 kernels on an AMD EPYC did, by 1 ulp).
    read_out = model.out(model.norm(model.residual_stream(tokens)))[:, -1]
    assert mx.allclose(model(tokens), read_out, rtol=1e-6, atol=1e-6).item()


def test_mlp_hidden_activations_are_the_input_of_w2():
    mx.random.seed(5)
    ff = Transformer(ModelConfig(dim=16, depth=1, dropout=0.0), 11).blocks[0].ff
    x = mx.random.normal((3, 4, 16))
    assert ff.hidden(x).shape == (3, 4, 64)
    assert mx.allclose(ff(x), ff.w2(ff.hidden(x)))
    assert mx.allclose(ff.hidden(x), nn.silu(ff.w1(x)) * ff.w3(x))


def test_attention_is_causal():
    mx.random.seed(2)
    model = Transformer(ModelConfig(dim=16, depth=2, heads=2, dropout=0.0), 11)
    a = mx.array([[1, 10, 3, 4]])
    b = mx.array([[1, 10, 3, 7]])  # differs only in the last token
    la, lb = model.residual_stream(a), model.residual_stream(b)
    assert np.allclose(np.array(la[:, :3]), np.array(lb[:, :3]), atol=0)
    assert not np.allclose(np.array(la[:, 3]), np.array(lb[:, 3]))


def test_dropout_only_in_training_mode():
    mx.random.seed(3)
    model = Transformer(ModelConfig(dim=16, depth=1, heads=1, dropout=0.5), 11)
    tokens = mx.random.randint(0, 11, (8, 4))
    model.eval()
    assert mx.array_equal(model(tokens), model(tokens))
    model.train()
    assert not mx.array_equal(model(tokens), model(tokens))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=130, heads=4), "dim=130 must be divisible by model.heads=4"),
    (dict(dim=0), "dim=0 must be a positive integer"),
    (dict(depth=-1), "depth=-1 must be a positive integer"),
    (dict(heads=0), "heads=0 must be a positive integer"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0.1 must be in \[0, 1\)"),
])
def test_bad_model_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
