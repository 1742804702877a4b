"""QUAD's native preconditioner fit (``training/speed/quad_fit.cpp``) against ``optimizers.quad.quad_iteration``: every
pair of dense and diagonal factors, float32 and float64, with and without the per-slice scales, gated slices left
exactly as they were, strided inputs, compiled as eager; the native momentum against ``momentum_update``, bit for
bit; QUAD's steps and the trainer with them as without; the plain functions where they do not apply; one-line
errors. (Its 300-step parity with the PyTorch reference is in
``test_quad.py``.)"""
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import data
from config import Config, override
from numerics import rel_err
from optimizers.quad import QUAD, momentum_update as plain_momentum_update, quad_iteration as plain_iteration
from training.speed import quad_fit
from training.speed.trainer import FastTrainer

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                               reason="the primitive is built with g++ on Linux"),
              pytest.mark.usefixtures("cpu_stream")]

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture(scope="module")
def extension():
    module = quad_fit.load_extension()
    assert module is not None, "nanobind is in requirements.txt and fastblas loads a CBLAS: it should build here"
    return module


def stack(S, m, n, diag, dtype, seed=0):
    """A random stack: G (S, m, n), symmetric positive definite dense factors or positive diagonal ones, and
    Lipschitz estimates, in their QUAD shapes."""
    rng = np.random.default_rng(seed)

    def factor(d, is_diag):
        if is_diag:
            return mx.array(rng.uniform(0.5, 1.5, (S, d)), dtype)
        a = 0.1 * rng.standard_normal((S, d, d))
        return mx.array(np.eye(d) + a @ a.transpose(0, 2, 1), dtype)
    G = mx.array(rng.standard_normal((S, m, n)), dtype)
    Q = [factor(d, is_diag) for d, is_diag in zip((m, n), diag)]
    L = [mx.array(rng.uniform(0, 3, (S, 1) if is_diag else (S, 1, 1)), dtype) for is_diag in diag]
    return G, Q, L


def per_slice_options(S, dtype, seed=1):
    """Per-slice scales, a Pg scale and a gate with the last slice off (its scales 1, as QUAD gives them)."""
    rng = np.random.default_rng(seed)
    gate = np.arange(S) < S - 1
    scales = [mx.array(np.where(gate, rng.uniform(0.5, 2, S), 1), dtype) for _ in range(2)]
    return dict(scales=scales, gate=mx.array(gate), scale_pg=mx.array(np.where(gate, rng.uniform(0.5, 2, S), 1), dtype))


def fits(G, Q, L, diag, **options):
    """The plain and the native fit's (Pg, Q, L), flattened."""
    results = []
    for fit in (plain_iteration, quad_fit.quad_iteration):
        Pg, new_Q, new_L = fit(Q, L, G, diag, 0.8, 0.95, numel=G.size, **options)
        mx.eval(Pg, new_Q, new_L)
        results.append([Pg, *new_Q, *new_L])
    return results


@pytest.mark.parametrize("dtype, tolerance", [(mx.float64, 1e-13), (mx.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 17, 9), (1, 33, 40)])
@pytest.mark.parametrize("diag", LAYOUTS)
@pytest.mark.parametrize("scaled", [False, True])
def test_the_native_fit_is_quad_iteration_to_rounding(extension, diag, shape, dtype, tolerance, scaled):
    G, Q, L = stack(*shape, diag, dtype)
    plain, native = fits(G, Q, L, diag, **(per_slice_options(shape[0], dtype) if scaled else {}))
    for name, a, b in zip(["Pg", "Q_left", "Q_right", "L_left", "L_right"], native, plain):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= tolerance, (name, rel_err(a, b))


@pytest.mark.parametrize("diag", LAYOUTS)
def test_gated_slices_keep_their_factors_exactly(extension, diag):
    G, Q, L = stack(3, 8, 6, diag, mx.float32)
    _, native = fits(G, Q, L, diag, **per_slice_options(3, mx.float32))
    for new, old in zip(native[1:], [*Q, *L]):
        assert np.array_equal(np.array(new[2]), np.array(old[2]))  # the gate's last slice is off
        assert not np.array_equal(np.array(new[0]), np.array(old[0]))


def test_dense_factors_stay_symmetric(extension):
    G, Q, L = stack(2, 12, 10, (False, False), mx.float32)
    _, native = fits(G, Q, L, (False, False), **per_slice_options(2, mx.float32))
    for q in native[1:3]:
        assert np.array_equal(np.array(q), np.array(q.swapaxes(-1, -2)))


def test_strided_inputs_are_read_as_their_values(extension):
    G, Q, L = stack(2, 7, 9, (False, True), mx.float32)
    every_other = mx.array(np.array(G).repeat(2, axis=2))[:, :, ::2]  # G's values with a stride of 2
    transposed = mx.array(np.array(G).transpose(0, 2, 1)).swapaxes(-1, -2)  # a transposed view of them
    for view in (every_other, transposed):
        plain, native = fits(view, Q, L, (False, True))
        assert all(rel_err(a, b) <= 2e-6 for a, b in zip(native, plain))


def test_compiled_equals_eager(extension):
    G, Q, L = stack(2, 8, 8, (False, True), mx.float32)
    options = per_slice_options(2, mx.float32)

    def run(G, Q, L):
        Pg, new_Q, new_L = quad_fit.quad_iteration(Q, L, G, (False, True), 0.8, 0.95, numel=G.size, **options)
        return [Pg, *new_Q, *new_L]
    for a, b in zip(mx.compile(run)(G, Q, L), run(G, Q, L)):
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float64])
@pytest.mark.parametrize("shape", [(5, 33), (3, 7, 9), (1, 128, 130)])
@pytest.mark.parametrize("normalized", [False, True])
def test_the_native_momentum_is_momentum_updates_bits(extension, shape, dtype, normalized):
    rng = np.random.default_rng(2)
    M, G = (mx.array(rng.standard_normal(shape), dtype) for _ in range(2))
    weight = mx.array(rng.uniform(0, 1, shape[0]), dtype)
    norm = mx.array(rng.uniform(0.5, 2, shape[0]), dtype) if normalized else None
    for g in (G, mx.array(np.array(G).swapaxes(0, -1), dtype).swapaxes(0, -1)):  # row-major, a transposed view
        expected = mx.compile(plain_momentum_update)(M, g, weight, norm)  # fused, as QUAD's compiled step runs it
        for got in (quad_fit.momentum_update(M, g, weight, norm), plain_momentum_update(M, g, weight, norm)):
            assert np.array_equal(np.array(got), np.array(expected))


def test_rank_one_tensors_take_the_plain_function(extension):
    G = mx.array(np.random.default_rng(0).standard_normal((3, 16)), mx.float32)
    Q, L = [mx.ones((3, 16))], [mx.zeros((3, 1))]
    for a, b in zip(plain_iteration(Q, L, G, (), 0.8, 0.95), quad_fit.quad_iteration(Q, L, G, (), 0.8, 0.95)):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert np.array_equal(np.array(x), np.array(y))


def quad_run(dtype, fit):
    """Eight QUAD steps on five parameters: startup fits, later steps, balancing (every 3 updates), a permuted
    layout, a rank-1 tensor, and one whose gradient is zero on some steps; the parameters and state, flattened."""
    shapes = {"a": (12, 7), "b": (3, 5, 6), "c": (40, 6), "d": (9,), "e": (6, 6)}
    params = {name: mx.array(np.random.default_rng(len(name)).standard_normal(shape), dtype)
              for name, shape in shapes.items()}
    lr = mx.array(3e-3, dtype) if dtype == mx.float64 else 3e-3
    optimizer = QUAD(learning_rate=lr, balance_every=3, quad_iteration=fit)
    for step in range(8):
        grads = {name: mx.array(np.random.default_rng([step, len(name)]).standard_normal(shape), dtype)
                 for name, shape in shapes.items()}
        if step % 3 == 1:
            grads["e"] = mx.zeros_like(grads["e"])
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    return {key.replace(str(dtype).split(".")[-1], "dtype"): np.array(value, dtype=np.float64)  # group names
            for key, value in tree_flatten((params, optimizer.state))}


def test_quad_steps_with_the_native_fit_follow_the_plain_ones(extension):
    """float64: the same to 1e-10. float32: about as far from the float64 run as the plain fit's float32 run is:
    rounding, amplified alike by the fits (up to 4e-4 for the small dense tensor "e", plain or native, whose
    fits see zero gradients; within 7x of each other there, 2.5x elsewhere)."""
    plain64, native64 = quad_run(mx.float64, plain_iteration), quad_run(mx.float64, quad_fit.quad_iteration)
    plain32, native32 = quad_run(mx.float32, plain_iteration), quad_run(mx.float32, quad_fit.quad_iteration)
    assert plain64.keys() == native64.keys() == native32.keys()
    for key, reference in plain64.items():
        assert rel_err(native64[key], reference) <= 1e-10, key
        assert rel_err(native32[key], reference) <= 10 * rel_err(plain32[key], reference) + 1e-6, key


def test_the_trainer_fits_quad_natively_and_follows_the_plain_fit(extension):
    cfg = override(Config(), {"data.p": 11, "model.dim": 32, "model.heads": 2, "train.batch_size": 32,
                              "optim.name": "quad"})
    tokens, labels = data.modular_arithmetic(cfg.data)
    x, y = mx.array(tokens[:64]), mx.array(labels[:64])
    params = {}
    for native in (True, False):
        mx.random.seed(0)
        trainer = FastTrainer(cfg, native_quad=native)
        assert (trainer.optimizer.quad_iteration is quad_fit.quad_iteration) == native
        assert (trainer.optimizer.momentum_update is quad_fit.momentum_update) == native
        for _ in range(3):
            trainer.step(x, y)
        mx.eval(trainer.model.parameters())
        params[native] = tree_map(np.array, dict(tree_flatten(trainer.model.parameters())))
    for name, value in params[True].items():  # float32 rounding, amplified by the ten startup fits
        assert rel_err(value, params[False][name]) <= 1e-3, name


def test_without_the_extension_the_plain_function_runs(monkeypatch):
    monkeypatch.setattr(quad_fit, "import_extension", lambda source, name, probe: None)
    quad_fit.load_extension.cache_clear()
    try:
        G, Q, L = stack(2, 5, 4, (False, True), mx.float32)
        plain, native = fits(G, Q, L, (False, True))
        assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(native, plain))
        weight = mx.ones((2,))
        assert np.array_equal(np.array(quad_fit.momentum_update(G, 2 * G, weight)),
                              np.array(plain_momentum_update(G, 2 * G, weight)))
        trainer = FastTrainer(override(Config(), {"data.p": 11, "model.dim": 32, "model.heads": 2,
                                                  "optim.name": "quad"}))
        assert trainer.optimizer.quad_iteration is plain_iteration
        assert trainer.optimizer.momentum_update is plain_momentum_update
    finally:
        quad_fit.load_extension.cache_clear()


def ones(*shape, dtype=mx.float32):
    return mx.ones(shape, dtype)


@pytest.mark.parametrize("call, message", [
    (lambda e: e.quad_fit(ones(2, 3), ones(2, 2), ones(2, 3), ones(2), ones(2), ones(2), ones(2), ones(2),
                          mx.ones(2, mx.bool_), 0.8, 0.95, 1.0, 1.0),
     "(S, m, n) array with m, n >= 1, not a float32 (2, 3) array"),
    (lambda e: e.quad_fit(ones(2, 0, 4), ones(2, 0), ones(2, 4), ones(2), ones(2), ones(2), ones(2), ones(2),
                          mx.ones(2, mx.bool_), 0.8, 0.95, 1.0, 1.0), "m, n >= 1, not a float32 (2, 0, 4) array"),
    (lambda e: e.quad_fit(ones(2, 3, 4), ones(2, 3, 4), ones(2, 4), ones(2), ones(2), ones(2), ones(2), ones(2),
                          mx.ones(2, mx.bool_), 0.8, 0.95, 1.0, 1.0),
     "Q_l must be (S, d, d) or (S, d), of G's dtype, not a float32 (2, 3, 4) array"),
    (lambda e: e.quad_fit(ones(2, 3, 4), ones(2, 3), ones(2, 4, dtype=mx.float64), ones(2), ones(2), ones(2),
                          ones(2), ones(2), mx.ones(2, mx.bool_), 0.8, 0.95, 1.0, 1.0),
     "Q_r must be (S, d, d) or (S, d), of G's dtype, not a float64 (2, 4) array"),
    (lambda e: e.quad_fit(ones(2, 3, 4), ones(2, 3), ones(2, 4), ones(3), ones(2), ones(2), ones(2), ones(2),
                          mx.ones(2, mx.bool_), 0.8, 0.95, 1.0, 1.0),
     "one entry per slice, of G's dtype, not a float32 (3,) array"),
    (lambda e: e.quad_fit(ones(2, 3, 4), ones(2, 3), ones(2, 4), ones(2), ones(2), ones(2), ones(2), ones(2),
                          ones(2), 0.8, 0.95, 1.0, 1.0),
     "gate must be a bool vector with one entry per slice, not a float32 (2,) array"),
])
def test_fit_bad_input_gets_a_one_line_error(extension, call, message):
    with pytest.raises(ValueError) as error:
        call(extension)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("call, message", [
    (lambda e: e.momentum_update(ones(2, 3), ones(2, 4), ones(2), None),
     "one shape and dtype, not a float32 (2, 4) array"),
    (lambda e: e.momentum_update(ones(2, 3), ones(2, 3, dtype=mx.float64), ones(2), None),
     "one shape and dtype, not a float64 (2, 3) array"),
    (lambda e: e.momentum_update(ones(2, 3), ones(2, 3), ones(3), None),
     "one entry per slice, of M's dtype, not a float32 (3,) array"),
    (lambda e: e.momentum_update(ones(2, 3), ones(2, 3), ones(2), ones(2, dtype=mx.float64)),
     "one entry per slice, of M's dtype, not a float64 (2,) array"),
])
def test_momentum_bad_input_gets_a_one_line_error(extension, call, message):
    with pytest.raises(ValueError) as error:
        call(extension)
    assert message in str(error.value) and "\n" not in str(error.value)
