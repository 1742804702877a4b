"""Tests for ``optimizers/quad.py`` (PSGD-QUAD).

Parity: ``data/quad_reference.npz`` holds snapshots of the PyTorch reference (``quad.py`` of
evanatyourservice/mlx-grokking @ 36a93bc, run eagerly on the CPU with the grokking configuration
on 17 tensor shapes for 300 steps), trimmed by ``data/make_quad_reference.py``, and the tolerances
derived for it. The gradients are regenerated here, bit for bit, from the seeded NumPy recipe below.
The metric is ``rel_dp = ||p - p_ref|| / ||p_ref - p0||``: the error relative to the distance moved.
"""
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from optimizers import OptimConfig, build_optimizer
from optimizers.quad import QUAD, balance_ratio, lower_bound_norm, update_dense_side
from optimizers.quad_groups import factor_layout, merge_dims_to_three, permutation
from training.speed import quad_fit

REFERENCE = np.load(Path(__file__).parent / "data" / "quad_reference.npz")
TOLERANCES = json.loads(str(REFERENCE["tolerances_json"]))
GROKKING = dict(momentum=0.9, weight_decay=0.3, preconditioner_lr=1.0, max_size_dense=float("inf"),
                max_skew_dense=1.0, precondition_largest_two_dims=True, normalize_grads=True)

pytestmark = pytest.mark.usefixtures("cpu_stream")


# ---- the reference's gradient recipe (NumPy Generator streams, bit-exact) -------------------------
BASE_SEED = 20250625
SHAPES = [(), (7,), (1,), (5, 3), (3, 5), (64, 64), (128, 512), (99, 128), (2, 3, 4), (4, 6, 8, 2),
          (16, 4, 8), (1, 10), (6, 2, 3, 5), (3, 20, 8), (4, 32, 24), (96, 32), (1, 4, 128)]


def gradient_structure(k, shape):
    """Tensor k's fixed anisotropic scale (an outer product of per-axis factors) and mean."""
    rng = np.random.default_rng([BASE_SEED, k, 0])
    scale = np.ones(shape, dtype=np.float64)
    for axis, n in enumerate(shape):
        factor = np.exp(rng.uniform(-1.0, 1.0, size=n))
        scale = scale * factor.reshape([n if i == axis else 1 for i in range(len(shape))])
    mean = 0.3 * np.asarray(rng.standard_normal(shape), dtype=np.float64)
    return np.asarray(scale, dtype=np.float32), np.asarray(mean, dtype=np.float32)


def reference_gradient(k, t, shape, structure):
    scale, mean = structure
    z = np.asarray(np.random.default_rng([BASE_SEED, k, t]).standard_normal(shape, dtype=np.float32),
                   dtype=np.float32)
    return np.asarray(scale * z + mean, dtype=np.float32)


def initial_parameter(k, shape):
    x = 0.5 * np.asarray(np.random.default_rng([BASE_SEED, k, 999999]).standard_normal(shape), dtype=np.float64)
    return np.asarray(x, dtype=np.float32)


def test_gradient_recipe_is_the_references():
    for k in (3, 12):
        g = reference_gradient(k, 2, SHAPES[k], gradient_structure(k, SHAPES[k]))
        np.testing.assert_array_equal(g, REFERENCE[f"grad__s{k:02d}__g2"])


def replay(dtype, fit="plain"):
    """Run QUAD on the 17 reference tensors for 300 steps, its preconditioner fitted by ``quad_iteration`` or
    (``fit="native"``) the speed layer's native primitives (and its momentum); return parameter and state
    snapshots."""
    # A float64 learning rate: as a Python float it would be stored as float32 (0.003000000026).
    lr = mx.array(3e-3, dtype=mx.float64) if dtype == mx.float64 else 3e-3
    optimizer = QUAD(learning_rate=lr, **GROKKING)
    if fit == "native":
        if not quad_fit.install(optimizer):
            pytest.skip("the native fit does not build here (no g++, nanobind or CBLAS)")
    names = [f"s{k:02d}" for k in range(len(SHAPES))]
    structures = [gradient_structure(k, s) for k, s in enumerate(SHAPES)]
    params = {n: mx.array(initial_parameter(k, s).astype(np.float64), dtype=dtype)
              for k, (n, s) in enumerate(zip(names, SHAPES))}
    snapshots = {}
    for t in range(1, 301):
        grads = {n: mx.array(reference_gradient(k, t, s, structures[k]).astype(np.float64), dtype=dtype)
                 for k, (n, s) in enumerate(zip(names, SHAPES))}
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
        for n in names:
            snapshots[f"{n}__p{t:03d}"] = np.array(params[n])
            if t in (1, 249, 250, 300):
                state = optimizer.parameter_state(n)
                for i, (q, ell) in enumerate(zip(state["Q"], state["L"])):
                    snapshots[f"{n}__state{t:03d}__Q{i}"] = np.array(q)
                    snapshots[f"{n}__state{t:03d}__L{i}"] = np.array(ell)
    return snapshots


@pytest.fixture(scope="module")
def replay64():
    return replay(mx.float64)


@pytest.fixture(scope="module")
def replay32():
    return replay(mx.float32)


@pytest.fixture(scope="module")
def replay64_native():
    return replay(mx.float64, "native")


@pytest.fixture(scope="module")
def replay32_native():
    return replay(mx.float32, "native")


def parity_errors(snapshots, precision):
    """``{(k, t): rel_dp}`` against every stored reference snapshot, and the limits (None: finite only)."""
    errors, limits = {}, {}
    for key in REFERENCE.files:
        parts = key.split("__")
        if parts[0] != precision or not parts[2].startswith("p"):
            continue
        k, t = int(parts[1][1:]), int(parts[2][1:])
        ref = REFERENCE[key].astype(np.float64)
        ours = snapshots[f"{parts[1]}__{parts[2]}"].astype(np.float64)
        assert np.all(np.isfinite(ours)), key
        p0 = initial_parameter(k, SHAPES[k]).astype(np.float64)
        errors[k, t] = np.linalg.norm(ours - ref) / np.linalg.norm(ref - p0)
        limits[k, t] = TOLERANCES[precision][str(k)][str(t)]
    return errors, limits


@pytest.mark.parametrize("fit", ["plain", "native"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_parameters_match_the_reference(precision, fit, request):
    """The same limits for the plain fit and the speed layer's native one (``training/speed/quad_fit.cpp``)."""
    snapshots = request.getfixturevalue(("replay64" if precision == "float64" else "replay32")
                                        + ("_native" if fit == "native" else ""))
    errors, limits = parity_errors(snapshots, precision)
    assert len(errors) == 16 * 4 + 1
    failures = {key: (err, limits[key]) for key, err in errors.items()
                if limits[key] is not None and not err <= limits[key]}
    assert not failures, failures
    if precision == "float64":  # the well-conditioned kinds, which include every grokking-model tensor
        assert max(err for (k, t), err in errors.items() if k not in (5, 8, 9, 10, 13)) <= 1e-10


def test_factor_states_match_the_reference(replay32):
    """Q and L in the reference layout; balancing shows only here (the parameters don't see it)."""
    failures = {}
    for key in REFERENCE.files:
        parts = key.split("__")
        if parts[0] != "float32" or not parts[2].startswith("state"):
            continue
        k, t, what = int(parts[1][1:]), int(parts[2][len("state"):]), parts[3]
        ref = REFERENCE[key].astype(np.float64)
        ours = np.broadcast_to(replay32["__".join(parts[1:])], ref.shape).astype(np.float64)
        assert np.all(np.isfinite(ours)), key
        err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        limit = TOLERANCES["float32_states"][str(k)][str(t)][what]
        if (k, t, what) == (10, 1, "Q1"):
            # The rank-deficient 16x16 factor of the (16, 4, 8) tensor: the float32 reference's is
            # itself 3e-4 away from our float64 run's (whose parameters match the float64
            # reference to 3e-12); the stored limit came from a NumPy port that rounds like PyTorch.
            limit = 1e-3
        if limit is not None and not err <= limit:
            failures[key] = (err, limit)
    assert not failures, failures


# ---- an independent NumPy restatement of the spec, for balancing and startup on small tensors ----

def numpy_quad(p, grads, lr, momentum, weight_decay, eta, balance_every, startup=10, beta_l=0.95, eps=1e-6):
    """QUAD on one 2-D float64 tensor with max_skew_dense = 1, normalize_grads on, written from the
    spec with plain loops; returns the parameters and the factor states after the last step."""
    m_, n_ = p.shape
    numel, diag = m_ * n_, (m_ > n_, n_ > m_)
    targets = (numel / m_, numel / n_)
    for t, g in enumerate(grads, 1):
        g = g / (np.linalg.norm(g) + eps)
        if t == 1:
            mom, s = g.copy(), (np.mean(g ** 4) ** (-1 / 8)) ** 0.5
            Q = [s * np.ones(d) if dg else s * np.eye(d) for d, dg in zip((m_, n_), diag)]
            L = [0.0, 0.0]
        mom = mom + (1 - momentum) * (g - mom)
        if t % balance_every == 0:
            rho = np.sqrt(np.abs(Q[0]).max() / np.abs(Q[1]).max())
            Q = [Q[0] / rho, Q[1] * rho]
        for _ in range(startup if t == 1 else 1):
            P = [np.diag(q * q) if dg else q @ q.T for q, dg in zip(Q, diag)]
            Pg = P[0] @ mom @ P[1]
            new_Q = []
            for side in range(2):
                q, c = Q[side], targets[side]
                if diag[side]:
                    energy = (Pg ** 2).sum(axis=1 - side)
                    ell = energy.max() + c
                    L[side] = max(beta_l * L[side] + (1 - beta_l) * ell, ell)
                    gamma = 1 - (eta / 2) / L[side] * (energy - c)
                    new_Q.append(q * gamma * gamma)
                else:
                    T = Pg @ Pg.T if side == 0 else Pg.T @ Pg
                    r = (T ** 2).sum(axis=1)
                    v = T[np.argmax(r)] / np.sqrt(r.max())
                    ell = np.linalg.norm(T @ v) + c
                    L[side] = max(beta_l * L[side] + (1 - beta_l) * ell, ell)
                    E = np.eye(len(T)) - (eta / 2) / L[side] * (T - c * np.eye(len(T)))
                    new = E @ q @ E
                    new_Q.append((new + new.T) / 2)
            Q = new_Q
        p = p * (1 - lr * weight_decay) - lr / 3 * Pg
    return p, Q, L


@pytest.mark.parametrize("shape", [(3, 4), (5, 5), (7, 2)])
def test_matches_a_numpy_restatement_with_frequent_balancing(shape):
    rng = np.random.default_rng(sum(shape))
    p0 = rng.standard_normal(shape)
    scale = np.exp(rng.uniform(-1, 1, shape[0]))[:, None] * np.exp(rng.uniform(-1, 1, shape[1]))
    grads = [scale * rng.standard_normal(shape) + 0.3 for _ in range(30)]
    hyper = dict(momentum=0.9, weight_decay=0.3, balance_every=7)
    p_ref, Q_ref, L_ref = numpy_quad(p0, grads, lr=3e-3, eta=1.0, **hyper)
    optimizer = QUAD(learning_rate=mx.array(3e-3, dtype=mx.float64), preconditioner_lr=1.0,
                     max_size_dense=float("inf"), normalize_grads=True, **hyper)
    params = {"w": mx.array(p0, dtype=mx.float64)}
    for g in grads:
        params = optimizer.apply_gradients({"w": mx.array(g, dtype=mx.float64)}, params)
        mx.eval(params, optimizer.state)
    np.testing.assert_allclose(np.array(params["w"]), p_ref, rtol=1e-11, atol=1e-13)
    state = optimizer.parameter_state("w")
    for q, q_ref, ell, ell_ref in zip(state["Q"], Q_ref, state["L"], L_ref):
        np.testing.assert_allclose(np.array(q)[0], q_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.array(ell).ravel(), [ell_ref], rtol=1e-10)
    assert int(state["step"]) == 30


def test_zero_preconditioner_lr_is_scaled_momentum_sgd():
    """With preconditioner_lr = 0 the factors stay at s I: Pg = s^4 m (s^2 m for 1-D tensors)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 6), "b": (5,)}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(12)]
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    lr, beta, wd = 0.01, 0.8, 0.1
    optimizer = QUAD(learning_rate=mx.array(lr, dtype=mx.float64), momentum=beta, weight_decay=wd,
                     preconditioner_lr=0.0, balance_every=5)
    ours = tree_map(lambda x: mx.array(x, dtype=mx.float64), params)
    expected = dict(params)
    s = {k: np.mean(grads[0][k] ** 4) ** (-1 / 16) for k in shapes}
    m = {k: grads[0][k] for k in shapes}
    for g in grads:
        ours = optimizer.apply_gradients(tree_map(lambda x: mx.array(x, dtype=mx.float64), g), ours)
        for k in shapes:
            m[k] = m[k] + (1 - beta) * (g[k] - m[k])
            power = 4 if len(shapes[k]) == 2 else 2
            expected[k] = expected[k] * (1 - lr * wd) - lr / 3 * s[k] ** power * m[k]
    for k in shapes:
        np.testing.assert_allclose(np.array(ours[k]), expected[k], rtol=1e-12)


# ---- pure helpers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, merged", [((), ()), ((5,), (5,)), ((3, 4), (1, 3, 4)), ((2, 3, 4), (2, 3, 4)),
                                           ((4, 6, 8, 2), (4, 6, 16)), ((6, 2, 3, 5), (6, 6, 5)),
                                           ((8, 8, 2, 1), (8, 8, 2)), ((2, 3, 4, 5, 6), (6, 20, 6))])
def test_merge_dims_to_three(shape, merged):
    assert merge_dims_to_three(shape) == merged


@pytest.mark.parametrize("merged, order", [((16, 4, 8), (1, 2, 0)), ((6, 6, 5), (2, 0, 1)), ((7, 1, 1), (1, 2, 0)),
                                           ((3, 1, 5), (1, 0, 2)), ((3, 20, 8), None), ((1, 4, 128), None)])
def test_permutation_sorts_the_axes(merged, order):
    assert permutation(merged) == order


@pytest.mark.parametrize("shape, pshape, diag", [
    ((128, 128), (1, 128, 128), (False, False)), ((512, 128), (1, 512, 128), (True, False)),
    ((128, 512), (1, 128, 512), (False, True)), ((99, 128), (1, 99, 128), (False, True)),
    ((1, 10), (1, 1, 10), (False, True)), ((10, 1), (1, 10, 1), (True, False)), ((1, 1), (1, 1, 1), (False, False)),
    ((16, 4, 8), (4, 8, 16), (False, False)), ((6, 2, 3, 5), (5, 6, 6), (False, False)), ((128,), (128,), ())])
def test_factor_layout(shape, pshape, diag):
    layout = factor_layout(shape, float("inf"), 1.0, True)
    assert (layout.shape, layout.diag) == (pshape, diag)


def test_factor_layout_size_and_skew_limits():
    assert factor_layout((64, 64), 32, 1.0, True).diag == (True, True)
    assert factor_layout((8, 64), float("inf"), 10.0, True).diag == (False, False)  # 64^2 <= 10 * 512
    assert factor_layout((16, 4, 8), float("inf"), 1.0, False).shape == (16, 4, 8)


def test_lower_bound_norm():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 2, 6, 9))
    T = X @ X.swapaxes(-1, -2)
    lb = np.array(lower_bound_norm(mx.array(T, dtype=mx.float64)))
    for j in np.ndindex(3, 2):
        r = (T[j] ** 2).sum(1)
        v = T[j][np.argmax(r)] / np.sqrt(r.max())
        assert lb[j].shape == (1, 1)
        np.testing.assert_allclose(lb[j][0, 0], np.linalg.norm(T[j] @ v), rtol=1e-13)
        assert lb[j][0, 0] <= np.linalg.norm(T[j], 2) * (1 + 1e-12)
    assert np.array(lower_bound_norm(mx.zeros((2, 4, 4)))).tolist() == [[[0.0]], [[0.0]]]  # not 0/0


def test_update_dense_side_is_a_congruence():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((2, 5, 5)), rng.standard_normal((2, 5, 8))
    Q, T = X @ X.swapaxes(-1, -2), Y @ Y.swapaxes(-1, -2)
    L = np.full((2, 1, 1), 3.0)
    new_Q, new_L = update_dense_side(mx.array(Q, dtype=mx.float64), mx.array(L, dtype=mx.float64),
                                     mx.array(T, dtype=mx.float64), 8.0, 0.8, 0.95)
    new_Q, new_L = np.array(new_Q), np.array(new_L)
    for j in range(2):
        lb = np.array(lower_bound_norm(mx.array(T[j:j + 1], dtype=mx.float64)))[0, 0, 0]
        assert new_L[j, 0, 0] == pytest.approx(max(0.95 * 3 + 0.05 * (lb + 8), lb + 8))
        E = np.eye(5) - 0.4 / new_L[j, 0, 0] * (T[j] - 8 * np.eye(5))
        np.testing.assert_allclose(new_Q[j], E @ Q[j] @ E, rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(new_Q[j], new_Q[j].T)
        assert np.linalg.eigvalsh(new_Q[j]).min() > -1e-9


def test_balance_ratio_keeps_the_kronecker_product():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1, 3, 4, 4))
    left, right = 50 * X @ X.swapaxes(-1, -2), np.exp(rng.standard_normal((1, 3, 6)))
    rho = np.array(balance_ratio(mx.array(left), mx.array(right), (False, True)))
    assert rho.shape == (1, 3)
    for j in range(3):
        new_left, new_right = left[0, j] / rho[0, j], right[0, j] * rho[0, j]
        assert np.abs(new_left).max() == pytest.approx(np.abs(new_right).max(), rel=1e-5)
        np.testing.assert_allclose(np.kron(new_left, np.diag(new_right)), np.kron(left[0, j], np.diag(right[0, j])),
                                   rtol=1e-5, atol=1e-5)


# ---- behaviour ---------------------------------------------------------------------------------------

def small_tree(dtype=mx.float32, seed=0):
    """Parameters of every kind the grokking model has, nested: DD, dD, Dd, 1-D, 0-D, a batch of 1."""
    rng = np.random.default_rng(seed)
    shapes = {"attn": {"wq": (6, 6), "wk": (6, 6)}, "mlp": [{"w1": (9, 3)}, {"w2": (3, 9)}],
              "norm": (6,), "scale": (), "pos": (1, 4, 8)}
    return tree_map(lambda s: mx.array(rng.standard_normal(s), dtype=dtype), shapes,
                    is_leaf=lambda x: isinstance(x, tuple))


def random_grads(params, rng):
    return tree_map(lambda p: mx.array(rng.standard_normal(p.shape), dtype=p.dtype), params)


def test_compiled_equals_eager_and_traces_twice():
    """Compiled from the first step, as main.train does: correct on every step (the startup at
    step 1, balancing at 250), traced once for the first step and once for all later ones."""
    rng = np.random.default_rng(0)
    grads = [random_grads(small_tree(mx.float64), rng) for _ in range(260)]
    eager = QUAD(learning_rate=mx.array(3e-3, dtype=mx.float64), **GROKKING)
    compiled = QUAD(learning_rate=mx.array(3e-3, dtype=mx.float64), **GROKKING)
    params_eager = params_compiled = small_tree(mx.float64)
    compiled.init(params_compiled)
    state = [compiled.state]
    traces = []

    def step(g, p):
        traces.append(1)
        return compiled.apply_gradients(g, p)
    step = mx.compile(step, inputs=state, outputs=state)
    for t, g in enumerate(grads, 1):
        params_eager = eager.apply_gradients(g, params_eager)
        params_compiled = step(g, params_compiled)
        mx.eval(params_eager, params_compiled, eager.state, compiled.state)
        if t == 1:
            assert len(traces) == 1 and "startup" not in compiled.state
            first_eager, first_compiled = tree_flatten(params_eager), tree_flatten(params_compiled)
    assert len(traces) == 2
    for (name, a), (_, b) in zip(first_eager, first_compiled):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-12, atol=1e-14, err_msg=name)
    for (name, a), (_, b) in zip(tree_flatten((params_eager, eager.state)),
                                 tree_flatten((params_compiled, compiled.state))):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-9, atol=1e-12, err_msg=name)


def test_streams_spread_the_groups_without_changing_the_result():
    rng = np.random.default_rng(1)
    grads = [random_grads(small_tree(), rng) for _ in range(3)]
    streams = [mx.new_stream(mx.cpu) for _ in range(2)]
    results = []
    for optimizer in (QUAD(), QUAD(streams=streams)):
        params = small_tree()
        optimizer.init(params)
        state = [optimizer.state]
        step = mx.compile(lambda g, p: optimizer.apply_gradients(g, p), inputs=state, outputs=state)
        for g in grads:
            params = step(g, params)
        mx.eval(params, state)
        results.append(dict(tree_flatten((params, optimizer.state))))
    for name, a in results[0].items():
        np.testing.assert_allclose(np.array(results[1][name]), np.array(a), rtol=1e-6, atol=1e-7, err_msg=name)


def test_startup_iterations_run_on_the_first_update_only():
    rng = np.random.default_rng(3)
    g1, g2 = ({"w": mx.array(rng.standard_normal((4, 4)))} for _ in range(2))
    results = []
    for startup in (10, 1):
        optimizer = QUAD(startup_iterations=startup)
        params = optimizer.apply_gradients(g1, {"w": mx.zeros((4, 4))})
        first = np.array(params["w"])
        params = optimizer.apply_gradients(g2, params)
        results.append((first, np.array(params["w"]) - first))
    assert not np.allclose(results[0][0], results[1][0])
    assert not np.allclose(results[0][1], results[1][1])  # the fitted factors carry over to step 2


def test_shapes_and_dtypes_are_preserved():
    params = {"h": small_tree(mx.float16), "b": small_tree(mx.bfloat16, seed=1), "f": small_tree(mx.float32, seed=2)}
    optimizer = QUAD()
    rng = np.random.default_rng(0)
    for _ in range(3):
        new = optimizer.apply_gradients(random_grads(params, rng), params)
        for (name, p), (_, q) in zip(tree_flatten(params), tree_flatten(new)):
            assert (q.shape, q.dtype) == (p.shape, p.dtype), name
            assert np.all(np.isfinite(np.array(q.astype(mx.float32)))), name
        params = new
    for name, s in tree_flatten(optimizer.state["groups"]):
        expected = {"step": mx.int32, "member": mx.uint32}.get(name.split(".")[-1], mx.float32)
        assert s.dtype == expected, name  # fp16/bf16: float32 maths
    assert optimizer.parameter_state("h.attn.wq")["m"].dtype == mx.float32


def test_float64_parameters_are_updated_in_float64():
    optimizer = QUAD()
    params = optimizer.apply_gradients({"w": mx.ones((3, 4), mx.float64)}, {"w": mx.zeros((3, 4), mx.float64)})
    assert params["w"].dtype == mx.float64
    assert all(s.dtype == mx.float64 for name, s in tree_flatten(optimizer.parameter_state("w")) if name != "step")


@pytest.mark.parametrize("shape", [(), (3,), (3, 4), (2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_every_rank(shape):
    rng = np.random.default_rng(len(shape))
    optimizer = QUAD(balance_every=3)
    params = {"w": mx.array(rng.standard_normal(shape), dtype=mx.float32)}
    start = np.array(params["w"])
    for _ in range(6):
        params = optimizer.apply_gradients({"w": mx.array(rng.standard_normal(shape), dtype=mx.float32)}, params)
    assert params["w"].shape == shape
    assert np.all(np.isfinite(np.array(params["w"]))) and not np.allclose(np.array(params["w"]), start)
    layout = factor_layout(shape, 8192, 1.0, True)
    expected = [layout.shape] if not layout.diag else [
        layout.shape[:1] + ((d,) if diag else (d, d)) for d, diag in zip(layout.shape[1:], layout.diag)]
    assert [q.shape for q in optimizer.parameter_state("w")["Q"]] == expected
    assert all(np.all(np.isfinite(np.array(x))) for _, x in tree_flatten(optimizer.state))


def test_precondition_largest_two_dims_off():
    rng = np.random.default_rng(0)
    shapes = {}
    for flag in (True, False):
        optimizer = QUAD(precondition_largest_two_dims=flag)
        params = {"w": mx.array(rng.standard_normal((16, 4, 8)), dtype=mx.float32)}
        for _ in range(3):
            g = {"w": mx.array(rng.standard_normal((16, 4, 8)), dtype=mx.float32)}
            params = optimizer.apply_gradients(g, params)
        assert params["w"].shape == (16, 4, 8) and np.all(np.isfinite(np.array(params["w"])))
        shapes[flag] = [q.shape for q in optimizer.parameter_state("w")["Q"]]
    assert shapes == {True: [(4, 8, 8), (4, 16, 16)], False: [(16, 4, 4), (16, 8, 8)]}


def test_groups_of_equal_layout_match_separate_updates():
    """Same-layout parameters are updated as one stack; that must not mix them up."""
    rng = np.random.default_rng(0)
    params = {f"w{i}": mx.array(rng.standard_normal((5, 7)), dtype=mx.float32) for i in range(3)}
    grads = [{k: mx.array(rng.standard_normal((5, 7)) * (i != 1 or t > 2), dtype=mx.float32)
              for i, k in enumerate(params)} for t in range(5)]
    together = QUAD(weight_decay=0.2)
    apart = {k: QUAD(weight_decay=0.2) for k in params}
    p_together, p_apart = dict(params), dict(params)
    for g in grads:
        p_together = together.apply_gradients(g, p_together)
        p_apart = {k: apart[k].apply_gradients({k: g[k]}, {k: p_apart[k]})[k] for k in params}
    for k in params:
        np.testing.assert_allclose(np.array(p_together[k]), np.array(p_apart[k]), rtol=1e-6, atol=1e-7)
        assert int(together.parameter_state(k)["step"]) == int(apart[k].parameter_state(k)["step"])


def test_a_missing_gradient_is_a_zero_gradient():
    """Group members without a gradient in the tree are left as they are, like zero gradients."""
    rng = np.random.default_rng(0)
    params = {f"w{i}": mx.array(rng.standard_normal((5, 7)), dtype=mx.float32) for i in range(3)}
    partial, zeros = QUAD(weight_decay=0.2), QUAD(weight_decay=0.2)
    p_partial, p_zeros = dict(params), dict(params)
    for t in range(4):
        g = {k: mx.array(rng.standard_normal((5, 7)), dtype=mx.float32) for k in params}
        given = {k: v for k, v in g.items() if k != "w1" or t == 3}
        p_partial = {**p_partial, **partial.apply_gradients(given, {k: p_partial[k] for k in given})}
        p_zeros = zeros.apply_gradients({k: given.get(k, mx.zeros_like(v)) for k, v in g.items()}, p_zeros)
        assert t == 3 or mx.array_equal(p_partial["w1"], params["w1"])
    for k in params:  # (w1 joined the partial optimizer's group last: compare by parameter)
        expected = dict(tree_flatten((p_zeros[k], zeros.parameter_state(k))))
        for name, a in tree_flatten((p_partial[k], partial.parameter_state(k))):
            assert mx.array_equal(a, expected[name]), (k, name)


def test_a_loaded_state_is_matched_to_the_parameters_by_path(tmp_path):
    """Rows are found by path, whatever order the groups were first built in; a parameter whose shape
    now puts it in another group is an error naming it; replacing the state needs no fresh optimizer."""
    rng = np.random.default_rng(0)
    params = {"a": mx.array(rng.standard_normal((4, 4)), dtype=mx.float32),
              "b": mx.array(rng.standard_normal((4, 4)), dtype=mx.float32)}
    optimizer = QUAD()
    optimizer.apply_gradients({"b": mx.ones((4, 4))}, {"b": params["b"]})  # b's row first
    optimizer.apply_gradients({k: mx.array(rng.standard_normal((4, 4)), dtype=mx.float32) for k in params}, params)
    mx.eval(optimizer.state)
    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(optimizer.state)))
    restored = QUAD()
    restored.state = tree_unflatten(list(mx.load(path).items()))
    restored.init(params)  # a first, as the tree lists them
    for k in params:
        for name, a in tree_flatten(optimizer.parameter_state(k)):
            assert mx.array_equal(a, dict(tree_flatten(restored.parameter_state(k)))[name]), (k, name)
    assert [int(restored.parameter_state(k)["step"]) for k in ("a", "b")] == [1, 2]
    restored.state = QUAD().state  # replaced by a fresh state: the groups are built again
    restored.init(params)
    assert [int(restored.parameter_state(k)["step"]) for k in ("a", "b")] == [0, 0]
    moved = QUAD()
    moved.state = tree_unflatten(list(mx.load(path).items()))
    with pytest.raises(ValueError, match="'a' has state in group 'float32_1x4x4_dense_dense'"):
        moved.init({"a": mx.zeros((4, 5)), "b": params["b"]})
    with pytest.raises(KeyError, match="'c'"):
        optimizer.parameter_state("c")


def compiled_run(optimizer, params, grads):
    """``grads`` through one step compiled as ``main.Trainer`` compiles it (state as implicit inputs)."""
    state = [optimizer.state]
    step = mx.compile(lambda g, p: optimizer.apply_gradients(g, p), inputs=state, outputs=state)
    for g in grads:
        params = step(g, params)
        mx.eval(params, state)
    return params


def assert_trees_equal(actual, expected):
    """Same leaves (by path, in any order) and the same bits."""
    actual, expected = dict(tree_flatten(actual)), dict(tree_flatten(expected))
    assert actual.keys() == expected.keys()
    for name, a in expected.items():
        assert a.dtype == actual[name].dtype and mx.array_equal(a, actual[name]), name


def as_dicts(tree):
    """``tree`` with every list turned into a dict keyed "0", "1", ... (how some tools unflatten)."""
    if isinstance(tree, dict):
        return {k: as_dicts(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return {str(i): as_dicts(v) for i, v in enumerate(tree)}
    return tree


@pytest.mark.parametrize("saved_after, form", [(0, "lists"), (3, "lists"), (3, "dicts")])
def test_a_compiled_step_right_after_assigning_a_saved_state_resumes_exactly(tmp_path, saved_after, form):
    """Regression: the first compiled step after ``optimizer.state = loaded`` re-initialised inside the
    trace and read the member ids there ("Attempting to eval an array during function transformations").
    Resuming from a checkpoint (tree_flatten + safetensors, a fresh optimizer) now continues the
    uninterrupted trajectory bit for bit, balancing included."""
    rng = np.random.default_rng(5)
    grads = [random_grads(small_tree(), rng) for _ in range(7)]
    uninterrupted = QUAD(balance_every=2)
    uninterrupted.init(small_tree())
    expected = compiled_run(uninterrupted, small_tree(), grads)

    first = QUAD(balance_every=2)
    first.init(small_tree())
    params = compiled_run(first, small_tree(), grads[:saved_after])
    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(first.state)))
    loaded = tree_unflatten(list(mx.load(path).items()))
    resumed = QUAD(balance_every=2)
    resumed.state = as_dicts(loaded) if form == "dicts" else loaded
    params = compiled_run(resumed, params, grads[saved_after:])
    assert_trees_equal((params, resumed.state), (expected, uninterrupted.state))


def test_the_pure_functional_compiled_pattern():
    """mlx's ``test_compiled_optimizer`` pattern: the state passed into a compiled function, assigned to
    ``optimizer.state`` there, the step taken and the state returned. It follows the implicit-state
    compiled run exactly, and traces twice (the startup step, then every later step)."""
    rng = np.random.default_rng(6)
    grads = [random_grads(small_tree(), rng) for _ in range(5)]
    reference = QUAD(balance_every=2)
    reference.init(small_tree())
    expected = compiled_run(reference, small_tree(), grads)

    optimizer = QUAD(balance_every=2)
    traces = []

    @mx.compile
    def pure_step(params, opt_state, g):
        traces.append(1)
        optimizer.state = opt_state
        params = optimizer.apply_gradients(g, params)
        return params, optimizer.state

    optimizer.init(small_tree())
    params, state = small_tree(), optimizer.state
    for g in grads:
        params, state = pure_step(params, state, g)
        mx.eval(params, state)
    assert len(traces) == 2
    assert_trees_equal((params, state), (expected, reference.state))


def test_a_state_of_unknown_rows_assigned_under_compile_is_an_error(tmp_path):
    """Under mx.compile a state's member ids cannot be read: a fresh optimizer must be given a loaded
    state outside the compiled function first (then the pure pattern works)."""
    optimizer = QUAD()
    optimizer.apply_gradients(random_grads(small_tree(), np.random.default_rng(0)), small_tree())
    mx.eval(optimizer.state)
    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(optimizer.state)))
    fresh = QUAD()

    @mx.compile
    def pure_step(params, opt_state, g):
        fresh.state = opt_state
        return fresh.apply_gradients(g, params), fresh.state
    g = random_grads(small_tree(), np.random.default_rng(1))
    with pytest.raises(ValueError, match="assign this state outside mx.compile"):
        pure_step(small_tree(), tree_unflatten(list(mx.load(path).items())), g)
    fresh.state = tree_unflatten(list(mx.load(path).items()))
    params, _ = pure_step(small_tree(), fresh.state, g)
    np.testing.assert_allclose(np.array(params["attn"]["wq"]),
                               np.array(optimizer.apply_gradients(g, small_tree())["attn"]["wq"]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize_grads", [False, True])
def test_a_zero_size_parameter_passes_through(normalize_grads):
    """Regression: a (0, 4) parameter crashed the first update with normalize_grads=False (a max over
    an empty axis). Like AdamW, QUAD returns it unchanged; it has no state and leaves the others'
    updates as they are, eagerly, compiled and through mlx's per-parameter path."""
    rng = np.random.default_rng(7)
    grads = [random_grads(small_tree(), rng) for _ in range(3)]
    empty = mx.zeros((0, 4))
    expected = compiled_run(QUAD(normalize_grads=normalize_grads), small_tree(), grads)
    for run in ("eager", "compiled", "apply_single"):
        optimizer = QUAD(normalize_grads=normalize_grads)
        params = {**small_tree(), "empty": empty}
        with_empty = [{**g, "empty": mx.ones((0, 4))} for g in grads]
        if run == "compiled":
            optimizer.init(params)
            params = compiled_run(optimizer, params, with_empty)
        else:
            if run == "apply_single":
                optim.Optimizer.init(optimizer, params)  # per-parameter state (init_single)
            for g in with_empty:
                params = (optim.Optimizer.apply_gradients(optimizer, g, params) if run == "apply_single"
                          else optimizer.apply_gradients(g, params))
        mx.eval(params)
        assert (params["empty"].shape, params["empty"].dtype) == ((0, 4), mx.float32), run
        if run != "apply_single":
            assert optimizer.parameter_state("empty") == {}
            for (name, a), (_, b) in zip(tree_flatten(expected), tree_flatten({k: params[k] for k in expected})):
                assert mx.array_equal(a, b), (run, name)
    adamw = optim.AdamW(learning_rate=1e-2).apply_gradients({"empty": mx.ones((0, 4))}, {"empty": empty})
    assert adamw["empty"].shape == (0, 4)


def test_apply_single_is_the_per_parameter_update():
    """mlx's own Optimizer.apply_gradients (one apply_single per parameter) gives the same steps."""
    rng = np.random.default_rng(0)
    grads = [random_grads(small_tree(), rng) for _ in range(4)]
    grouped, single = QUAD(balance_every=2), QUAD(balance_every=2)
    p_grouped = p_single = small_tree()
    optim.Optimizer.init(single, p_single)  # per-parameter state (init_single): groups of one
    for g in grads:
        p_grouped = grouped.apply_gradients(g, p_grouped)
        p_single = optim.Optimizer.apply_gradients(single, g, p_single)
    for (name, a), (_, b) in zip(tree_flatten(p_grouped), tree_flatten(p_single)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6, err_msg=name)


def test_state_round_trips_through_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    grads = [random_grads(small_tree(mx.bfloat16), rng) for _ in range(8)]
    for saved_after in (0, 3):
        optimizer = QUAD(balance_every=5)
        params = small_tree(mx.bfloat16)
        optimizer.init(params)
        for g in grads[:saved_after]:
            params = optimizer.apply_gradients(g, params)
        mx.eval(params, optimizer.state)
        path = str(tmp_path / f"state{saved_after}.safetensors")
        mx.save_safetensors(path, dict(tree_flatten(optimizer.state)))
        restored = QUAD(balance_every=5)
        restored.state = tree_unflatten(list(mx.load(path).items()))
        assert ("startup" in restored.state) == (saved_after == 0)
        params_restored = params
        for g in grads[saved_after:]:
            params = optimizer.apply_gradients(g, params)
            params_restored = restored.apply_gradients(g, params_restored)
        expected = dict(tree_flatten((params, optimizer.state)))
        for name, b in tree_flatten((params_restored, restored.state)):
            assert mx.array_equal(expected.pop(name), b), (saved_after, name)
        assert not expected


def test_zero_gradients_leave_a_tensor_untouched():
    """MLX gives unused parameters zero gradients: no NaN, no init, no decay, no step count."""
    rng = np.random.default_rng(0)
    params = {"used": mx.array(rng.standard_normal((4, 6)), dtype=mx.float32),
              "unused": mx.array(rng.standard_normal((6, 6)), dtype=mx.float32),
              "bias": mx.array(rng.standard_normal(6), dtype=mx.float32)}
    optimizer = QUAD(weight_decay=0.5, momentum=0.0, normalize_grads=True)
    optimizer.init(params)
    fresh = {k: dict(tree_flatten(optimizer.parameter_state(k))) for k in params}
    zero = {k: mx.zeros_like(v) for k, v in params.items()}

    def step(p, live):
        g = {k: mx.array(rng.standard_normal(v.shape), dtype=mx.float32) if k in live else zero[k]
             for k, v in p.items()}
        new = optimizer.apply_gradients(g, p)
        mx.eval(new, optimizer.state)
        assert all(np.all(np.isfinite(np.array(x))) for _, x in tree_flatten((new, optimizer.state)))
        return new

    new = step(params, live={"used"})
    for k in ("unused", "bias"):  # never had a gradient: exactly as before, state still fresh
        assert mx.array_equal(new[k], params[k])
        assert all(mx.array_equal(a, fresh[k][name]) for name, a in tree_flatten(optimizer.parameter_state(k)))
    assert not mx.array_equal(new["used"], params["used"])
    before = {"p": new["used"], "state": dict(tree_flatten(optimizer.parameter_state("used")))}
    new = step(new, live={"bias"})  # a zero gradient later: no decay, momentum or count change
    assert mx.array_equal(new["used"], before["p"])
    assert all(mx.array_equal(a, before["state"][name]) for name, a in tree_flatten(optimizer.parameter_state("used")))
    assert [int(optimizer.parameter_state(k)["step"]) for k in ("used", "unused", "bias")] == [1, 0, 1]
    for _ in range(3):  # a late first gradient initialises the tensor then
        new = step(new, live={"used", "unused", "bias"})
    assert [int(optimizer.parameter_state(k)["step"]) for k in ("used", "unused", "bias")] == [4, 3, 4]
    assert not mx.array_equal(new["unused"], params["unused"])


def test_minimises_an_ill_conditioned_quadratic_faster_than_sgd():
    """Steps to reach a fraction of the initial loss (the loss near the optimum oscillates with this
    lr, so the loss at one fixed step would depend on rounding; the first crossing does not)."""
    rng = np.random.default_rng(1)
    A = np.diag(np.logspace(-1, 0, 8)) @ np.linalg.qr(rng.standard_normal((8, 8)))[0]
    B = np.linalg.qr(rng.standard_normal((6, 6)))[0] @ np.diag(np.logspace(-1, 0, 6))
    A, B = mx.array(A, dtype=mx.float32), mx.array(B, dtype=mx.float32)
    target = mx.array(rng.standard_normal((8, 6)), dtype=mx.float32)

    def loss(params):
        return 0.5 * mx.sum((A @ (params["w"] - target) @ B) ** 2)
    grad = mx.grad(loss)
    initial = loss({"w": mx.zeros((8, 6))}).item()
    curves = {}
    for name, optimizer in (("sgd", optim.SGD(learning_rate=0.1)),
                            ("momentum", optim.SGD(learning_rate=0.1, momentum=0.9)),
                            ("quad", QUAD(learning_rate=0.1, momentum=0.9, weight_decay=0.0))):
        params, curves[name] = {"w": mx.zeros((8, 6))}, []
        for _ in range(200):
            params = optimizer.apply_gradients(grad(params), params)
            curves[name].append(loss(params).item() / initial)

    def steps_to(name, fraction):
        return next((i + 1 for i, value in enumerate(curves[name]) if value < fraction), math.inf)
    assert steps_to("sgd", 0.1) == math.inf  # plain SGD stays above 10 % for all 200 steps
    assert steps_to("quad", 0.01) < 0.5 * steps_to("momentum", 0.01), (steps_to("quad", 0.01),
                                                                     steps_to("momentum", 0.01))


def test_updates_a_module():
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = mx.random.normal((16, 4)), mx.random.normal((16, 2))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.mse_loss(m(x), y))
    optimizer = QUAD(learning_rate=0.1)
    losses = []
    for _ in range(30):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kwargs", [dict(learning_rate=-1.0), dict(momentum=1.0), dict(momentum=-0.1),
                                    dict(weight_decay=-0.1), dict(preconditioner_lr=-0.5), dict(max_size_dense=-1),
                                    dict(max_skew_dense=-1.0), dict(precond_beta=1.0), dict(startup_iterations=0),
                                    dict(startup_iterations=2.5), dict(balance_every=0), dict(update_scale=-1.0),
                                    dict(eps=-1e-6), dict(momentum=float("nan"))])
def test_bad_arguments_raise(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"{name}={value}"):
        QUAD(**kwargs)


def test_registry_entry_is_the_grokking_configuration():
    optimizer = build_optimizer(OptimConfig(name="quad", warmup_steps=0))
    assert isinstance(optimizer, QUAD)
    assert (optimizer.momentum, optimizer.weight_decay, optimizer.preconditioner_lr, optimizer.max_size_dense,
            optimizer.max_skew_dense, optimizer.normalize_grads) == (0.9, 0.3, 1.0, math.inf, 1.0, True)
    assert optimizer.learning_rate.item() == pytest.approx(3e-3)
    with pytest.raises(ValueError, match="beta2"):
        OptimConfig(name="quad", beta2=0.99)
