"""Every registry entry, as optax and mlx test their optimizers: shapes and dtypes kept, compiled equals eager and
does not retrace, the state round-trips through safetensors, a convex problem is solved, knobs are checked."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from config import Config, override
from optimizers import OPTIMIZERS, KNOB_FIELDS, OptimConfig, build_optimizer

NAMES = sorted(OPTIMIZERS)
ALIVE = []
# Traces under mx.compile: QUAD's first update runs its startup fits in a graph of its own.
TRACES = {"quad": 2}
# Knobs for the convex problem, at each optimizer's own scale (see ``lr_means``); no weight decay, which would pull
# the parameters off the target.
CONVEX = {"adamw": {"lr": 0.05}, "quad": {"lr": 0.1}, "muon": {"lr": 0.02, "adam_lr": 0.05},
          "lion": {"lr": 0.01}, "sgd": {"lr": 0.1}}

pytestmark = pytest.mark.usefixtures("cpu_stream")


def tree(dtype=mx.float32, seed=0):
    """A nested tree shaped like the model's: hidden matrices under ``blocks``, a vector, an embedding."""
    mx.random.seed(seed)
    return {"blocks": [{"w": mx.random.normal((6, 4)).astype(dtype), "norm": mx.ones((4,), dtype=dtype)}],
            "embedding": {"weight": mx.random.normal((5, 4)).astype(dtype)}}


def grads_of(params, seed):
    mx.random.seed(seed)
    return tree_map(lambda p: (0.1 * mx.random.normal(p.shape)).astype(p.dtype), params)


def make(name, **knobs):
    return build_optimizer(OptimConfig(name=name, warmup_steps=0, **knobs))


def test_the_registry_holds_the_optimizers_the_readme_lists():
    assert set(NAMES) >= {"adamw", "quad", "muon", "lion", "sgd"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])  # float16: mlx's AdamW eps (1e-8) underflows to 0
def test_shapes_and_dtypes_are_kept_on_a_nested_tree(name, dtype):
    params, optimizer = tree(dtype), make(name)
    optimizer.init(params)
    for step in range(3):
        params = optimizer.apply_gradients(grads_of(params, step), params)
    mx.eval(params)
    after_all = dict(tree_flatten(params))
    for key, before in tree_flatten(tree(dtype)):
        after = after_all[key]
        assert after.shape == before.shape and after.dtype == dtype, key
        assert np.isfinite(np.asarray(after.astype(mx.float32))).all(), key


def run_steps(name, compiled: bool, steps: int = 6, counter=None):
    params, optimizer = tree(), make(name)
    optimizer.init(params)
    state = [optimizer.state]

    def step(grads, params):
        if counter is not None:
            counter[0] += 1
        return optimizer.apply_gradients(grads, params)

    step = mx.compile(step, inputs=state, outputs=state) if compiled else step
    ALIVE.append(step)  # mx.compile caches traces by function id: a freed function's id may come back
    for i in range(steps):
        # Back in the input's key order, as model.update keeps it (MultiOptimizer merges its parts' results in
        # another order, and a reordered input tree is traced anew).
        out = dict(tree_flatten(step(grads_of(params, i), params)))
        params = tree_unflatten([(k, out[k]) for k, _ in tree_flatten(params)])
        mx.eval(params, state)
    return params, optimizer


@pytest.mark.parametrize("name", NAMES)
def test_compiled_equals_eager_and_traces_only_at_the_start(name):
    counter = [0]
    eager, _ = run_steps(name, False)
    compiled, _ = run_steps(name, True, counter=counter)
    compiled = dict(tree_flatten(compiled))
    for key, a in tree_flatten(eager):
        assert np.allclose(np.asarray(a), np.asarray(compiled[key]), rtol=1e-5, atol=1e-6), key
    assert counter[0] == TRACES.get(name, 1)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_safetensors_and_the_next_step_is_the_same(name, tmp_path):
    params, optimizer = run_steps(name, True, steps=4)
    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(optimizer.state)))
    grads = grads_of(params, 99)
    expected = optimizer.apply_gradients(grads, params)
    fresh = make(name)
    fresh.init(params)
    fresh.state = tree_unflatten(list(mx.load(path).items()))
    state = [fresh.state]
    got = mx.compile(lambda g, p: fresh.apply_gradients(g, p), inputs=state, outputs=state)(grads, params)
    got = dict(tree_flatten(got))
    for key, a in tree_flatten(expected):
        assert mx.array_equal(a, got[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_solves_a_convex_quadratic(name):
    params, optimizer = tree(), make(name, weight_decay=0.0, **CONVEX[name])
    target = dict(tree_flatten(tree(seed=1)))
    optimizer.init(params)
    state = [optimizer.state]

    def loss(params):
        return sum(((p - target[k]) ** 2).sum() for k, p in tree_flatten(params))

    @mx.compile
    def value(params):
        return loss(params)

    step = mx.compile(lambda p: optimizer.apply_gradients(mx.grad(loss)(p), p), inputs=state, outputs=state)
    start = value(params).item()
    for _ in range(400):
        params = step(params)
        mx.eval(params, state)
    assert value(params).item() < 0.05 * start


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_declares_valid_knobs_search_spaces_and_what_its_lr_means(name):
    entry = OPTIMIZERS[name]
    assert len(entry.lr_means) > 20 and "lr" in entry.hyperparameters
    for knob, hyper in entry.hyperparameters.items():
        assert knob in KNOB_FIELDS
        assert hyper.is_valid(hyper.default) and hyper.search and all(hyper.is_valid(v) for v in hyper.search), knob
        low, high = hyper.limits
        if not hyper.choices:
            assert (low is None or low <= hyper.default) and (high is None or hyper.default <= high), knob
    resolved = override(Config(), {"optim.name": name}).resolved().optim
    assert all(getattr(resolved, k) is not None for k in entry.hyperparameters)
    assert all(getattr(resolved, k) is None for k in KNOB_FIELDS if k not in entry.hyperparameters)


@pytest.mark.parametrize("name", NAMES)
def test_a_knob_the_optimizer_lacks_is_rejected_with_the_knobs_it_has(name):
    lacking = next(k for k in KNOB_FIELDS if k not in OPTIMIZERS[name].hyperparameters)
    value = "dense" if lacking == "preconditioner" else 0.5
    with pytest.raises(ValueError, match=rf"optim.{lacking}=.* is not a knob of '{name}' \(its knobs: lr"):
        override(Config(), {"optim.name": name, f"optim.{lacking}": value})


@pytest.mark.parametrize("knob, value, allowed", [
    ("lr", -1e-3, ">= 0"), ("weight_decay", float("nan"), ">= 0"), ("momentum", 1.0, "in [0, 1)"),
    ("preconditioner", "full", "one of ['dense', 'diagonal']"), ("preconditioner_lr", -0.5, ">= 0"),
])
def test_a_knob_value_outside_its_range_is_a_one_line_error(knob, value, allowed):
    with pytest.raises(ValueError) as error:
        override(Config(), {"optim.name": "quad", f"optim.{knob}": value})
    assert str(error.value) == f"optim.{knob}={value!r} must be {allowed} for 'quad'"


def test_quad_preconditioner_choice_reaches_the_factor_layout():
    dense, diagonal = make("quad"), make("quad", preconditioner="diagonal")
    params = tree()
    for optimizer in (dense, diagonal):
        optimizer.init(params)
    assert dense.max_size_dense == float("inf") and diagonal.max_size_dense == 0.0
    assert all(q.ndim == 2 for g in diagonal.state["groups"].values() for q in g["Q"])  # (k * b, d): diagonal
    assert any(q.ndim == 3 for g in dense.state["groups"].values() for q in g["Q"])  # (k * b, d, d): dense
