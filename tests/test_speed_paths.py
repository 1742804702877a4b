"""The fast paths equal the exact computation: hand-fused SiLU kernels vs ``nn.silu``, the pruned last
block vs ``full_forward``, a batch split over two CPU streams vs the whole batch, evaluation on streams
vs one stream, and the dropout masks drawn ahead of the forward pass vs those it draws itself."""
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import data
import main
import models
from models import ModelConfig, Transformer

SMALL = {"data.p": 11, "model.dim": 32, "model.heads": 2, "train.batch_size": 32}


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(autouse=True, scope="module")
def cpu_stream():
    """These are the Linux CPU backend's paths: test them on the CPU, also on a machine whose default
    device is a GPU (where the trainer does not take them)."""
    with mx.stream(mx.cpu):
        yield


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run the model with ``nn.silu`` and ``nn.Dropout``'s arithmetic, as on macOS."""
    monkeypatch.setattr(models, "use_fast_cpu_kernels", lambda: False)


def test_fast_paths_are_on_for_the_linux_cpu_backend():
    assert models.use_fast_cpu_kernels() == (sys.platform != "darwin" and mx.default_device() == mx.cpu)


def test_fast_sigmoid_matches_the_exact_sigmoid_and_its_gradient():
    x = np.concatenate([np.linspace(-100, 100, 200_001), [0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 150, -150]])
    x = mx.array(x.astype(np.float32))
    exact = 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))
    fast = np.asarray(mx.compile(models.fast_sigmoid)(x), dtype=np.float64)
    # float32 rounding of x * log2(e) alone makes ~4e-6 relative error at |x| ~ 87 (mx.sigmoid's too).
    normal = exact > 2.0 ** -126
    assert np.abs(fast - exact).max() <= 2e-7
    assert (np.abs(fast - exact) / exact)[normal].max() <= 5e-6
    assert fast[~normal].max() <= 2.0 ** -126  # below float32's normal range: 2**-126 or less
    grad = mx.grad(lambda x: models.fast_sigmoid(x).sum())(x)
    assert np.abs(np.asarray(grad) - exact * (1 - exact)).max() <= 1e-7


def test_silu_gate_matches_nn_silu_with_dropout_forward_and_backward():
    mx.random.seed(0)
    a, b, w = (mx.random.normal((64, 48)) * 4 for _ in range(3))
    keep = mx.random.bernoulli(0.8, a.shape)

    def fast(a, b):
        return (models.silu_gate(a, b, keep, mx.array(1 / 0.8))[0] * w).sum()

    def exact(a, b):  # nn.Dropout's arithmetic
        return (((keep * nn.silu(a)) * (1 / 0.8)) * b * w).sum()

    assert rel_err(fast(a, b), exact(a, b)) <= 1e-6
    for g_fast, g_exact in zip(mx.grad(fast, argnums=(0, 1))(a, b), mx.grad(exact, argnums=(0, 1))(a, b)):
        assert rel_err(g_fast, g_exact) <= 1e-6


@pytest.mark.parametrize("training", [False, True])
def test_fast_kernels_give_the_reference_logits(monkeypatch, training):
    model = Transformer(ModelConfig(dim=32, depth=2, heads=2), 13)
    model.train(training)
    tokens = mx.random.randint(0, 13, (40, 4))
    mx.random.seed(1)
    fast = model(tokens)
    monkeypatch.setattr(models, "use_fast_cpu_kernels", lambda: False)
    mx.random.seed(1)
    assert rel_err(fast, model(tokens)) <= 1e-5  # same dropout masks when training


def test_pruned_last_block_equals_full_forward_with_fast_kernels():
    mx.random.seed(2)
    model = Transformer(ModelConfig(dim=32, depth=2, heads=2), 13)
    model.eval()
    tokens = mx.random.randint(0, 13, (40, 4))
    assert rel_err(model(tokens), model.full_forward(tokens)[:, -1]) <= 1e-5


def test_masks_drawn_ahead_are_the_masks_the_forward_pass_draws():
    model = Transformer(ModelConfig(dim=16, depth=3, heads=2, dropout=0.3), 11)
    tokens = mx.random.randint(0, 11, (9, 4))
    mx.random.seed(3)
    drawn_inside = model(tokens)
    mx.random.seed(3)
    masks = model.dropout_masks(9, 4)
    assert [m.shape for m in masks] == [(9, 4, 64), (9, 4, 64), (9, 1, 64)]
    assert mx.array_equal(model(tokens, masks), drawn_inside)
    rows = [model(tokens[:5], [m[:5] for m in masks]), model(tokens[5:], [m[5:] for m in masks])]
    assert rel_err(mx.concatenate(rows), drawn_inside) <= 1e-6
    model.eval()
    assert model.dropout_masks(9, 4) is None


def sgd_step(cfg, split: bool, x, y):
    """Parameters before and after one step of the trainer with SGD(lr=1): their difference is the gradient."""
    trainer = main.Trainer(cfg, optimizer=optim.SGD(learning_rate=1.0))
    if not split:
        trainer.streams = None
    before = dict(tree_flatten(trainer.model.parameters()))
    mx.eval(before)
    loss, correct = trainer.step(x, y)
    mx.eval(trainer.state, loss, correct)
    after = dict(tree_flatten(trainer.model.parameters()))
    return {k: before[k] - after[k] for k in before}, loss.item(), correct.item()


@pytest.mark.parametrize("rows", [32, 7])  # a full batch and an odd partial one (parts of 4 and 3 rows)
def test_split_step_gradient_equals_the_whole_batch_mean_loss_gradient(rows):
    cfg = main.override(main.Config(), SMALL).resolved()
    x_train, y_train, _, _ = data.split(cfg.data, np.random.default_rng(0))
    x, y = mx.array(x_train[:rows]), mx.array(y_train[:rows])
    split_grads, split_loss, split_correct = sgd_step(cfg, True, x, y)
    whole_grads, whole_loss, whole_correct = sgd_step(cfg, False, x, y)

    # The exact version: nn.silu and nn.Dropout's arithmetic, the mean loss, one pass, the same masks.
    mx.random.seed(cfg.seed)
    model = Transformer(cfg.model, cfg.data.vocab_size)

    def mean_loss(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "use_fast_cpu_kernels", lambda: False)
        exact_loss, exact_grads = nn.value_and_grad(model, mean_loss)(model, x, y)
    exact_grads = dict(tree_flatten(exact_grads))

    assert split_grads.keys() == exact_grads.keys()
    for name, exact in exact_grads.items():
        assert rel_err(split_grads[name], exact) <= 1e-5, name
        assert rel_err(whole_grads[name], exact) <= 1e-5, name
    assert split_loss == pytest.approx(exact_loss.item() * rows, rel=1e-5)
    assert whole_loss == pytest.approx(split_loss, rel=1e-5)
    assert split_correct == whole_correct


@pytest.mark.parametrize("length", [1, 2, 3])
def test_logits_after_shared_prefixes_equal_the_whole_sequences(length):
    mx.random.seed(4)
    model = Transformer(ModelConfig(dim=32, depth=3, heads=2), 13)
    model.eval()
    tokens = mx.random.randint(0, 13, (50, 4))
    prefixes, inverse = np.unique(np.asarray(tokens[:, :length]), axis=0, return_inverse=True)
    past = model.prefix_keys_values(mx.array(prefixes))
    inverse = mx.array(inverse.reshape(-1))
    logits = model.logits_after(tokens[:, length:], [(k[inverse], v[inverse]) for k, v in past])
    assert rel_err(logits, model(tokens)) <= 1e-5


def test_shared_prefixes_picks_the_cheapest_split():
    cfg = main.override(main.Config(), {"data.p": 23}).resolved()
    _, _, x_val, _ = data.split(cfg.data, np.random.default_rng(0))
    length, prefixes, inverse = main.shared_prefixes(x_val)
    assert length == 2 and len(prefixes) <= 23  # "a op"
    assert np.array_equal(prefixes[inverse], x_val[:, :2])
    assert main.shared_prefixes(np.arange(40).reshape(10, 4)) is None  # nothing shared


def test_evaluation_on_streams_and_shared_prefixes_equals_the_plain_evaluation(monkeypatch):
    cfg = main.override(main.Config(), {**SMALL, "data.p": 47}).resolved()
    _, _, x_val, y_val = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    monkeypatch.setattr(main, "EVAL_CHUNK", 256)
    assert len(y_val) > 2 * main.EVAL_CHUNK  # several chunks per stream
    fast = [v.item() for v in main.Trainer(cfg).evaluate(x_val, y_val)]
    trainer = main.Trainer(cfg)  # the exact version: one stream, whole sequences, reference kernels
    trainer.streams = None
    monkeypatch.setattr(main, "shared_prefixes", lambda tokens: None)
    monkeypatch.setattr(models, "use_fast_cpu_kernels", lambda: False)
    exact = [v.item() for v in trainer.evaluate(x_val, y_val)]
    assert fast[0] == pytest.approx(exact[0], rel=1e-5)
    assert fast[1] == exact[1]


def test_an_epoch_equals_its_steps_one_by_one():
    """``Trainer.epoch`` draws each batch's masks a step ahead (on a stream of their own): same result."""
    cfg = main.override(main.Config(), {**SMALL, "data.p": 23}).resolved()
    x_train, y_train, _, _ = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    order = mx.array(np.random.default_rng(1).permutation(len(y_train))[:80])  # batches of 32, 32, 16
    by_epoch, by_step = main.Trainer(cfg), main.Trainer(cfg)
    mx.random.seed(5)
    loss, correct = by_epoch.epoch(x_train, y_train, order, cfg.train.batch_size)
    mx.eval(by_epoch.state, loss, correct)
    mx.random.seed(5)
    totals = [by_step.step(x_train[order[i:i + 32]], y_train[order[i:i + 32]]) for i in range(0, 80, 32)]
    mx.eval(by_step.state, totals)
    assert loss.item() == pytest.approx(sum(t[0].item() for t in totals), rel=1e-6)
    assert correct.item() == sum(t[1].item() for t in totals)
    for (name, a), (_, b) in zip(tree_flatten(by_epoch.model.parameters()), tree_flatten(by_step.model.parameters())):
        assert rel_err(a, b) <= 1e-6, name


def test_first_block_qkv_looked_up_per_token_equals_the_projections_logits_and_gradients(monkeypatch):
    """``Transformer.first_qkv`` (tables per token, one-hot matmul gradient) vs the per-position path."""
    mx.random.seed(4)
    model = Transformer(ModelConfig(dim=32, depth=2, heads=2), 13)
    tokens = mx.random.randint(0, 13, (40, 4))
    y = mx.random.randint(0, 13, (40,))
    masks = model.dropout_masks(40, 4)

    def loss(model):
        return nn.losses.cross_entropy(model(tokens, masks), y, reduction="sum")

    def run(lookup):
        monkeypatch.setattr(Transformer, "lookup_first_qkv", lookup)
        return model(tokens, masks), nn.value_and_grad(model, loss)(model)[1]

    (fast, fast_grads), (exact, exact_grads) = run(True), run(False)
    assert rel_err(fast, exact) <= 1e-5
    exact_grads = dict(tree_flatten(exact_grads))
    for key, g in tree_flatten(fast_grads):
        assert rel_err(g, exact_grads[key]) <= 1e-5, key
    model.eval()
    prefixes = tokens[:, :2]
    past = model.prefix_keys_values(prefixes)
    monkeypatch.setattr(Transformer, "lookup_first_qkv", False)
    exact = model.logits_after(tokens[:, 2:], past)
    monkeypatch.setattr(Transformer, "lookup_first_qkv", True)
    assert rel_err(model.logits_after(tokens[:, 2:], past), exact) <= 1e-5
