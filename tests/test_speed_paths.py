"""The Linux-CPU speed layer equals the plain path: the fused SiLU kernels vs ``nn.silu``, ``FastModel`` (pruned
last block, per-token q/k/v, shared prefixes) vs the plain ``Transformer``, a batch split over two CPU streams
vs the whole batch vs the plain Trainer's step, evaluation on streams vs the plain evaluation, an epoch
with masks drawn ahead vs its steps one by one, and the optimizers' updates spread over the streams vs on one."""
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import data
import training.speed
from config import Config, override
from models import ModelConfig, Transformer
from training import trainer as plain
from training.speed import kernels
from training.speed.model import FastModel
from optimizers import OPTIMIZERS
from training.speed.trainer import FastTrainer, shared_prefixes, updates_on_streams

SMALL = {"data.p": 11, "model.dim": 32, "model.heads": 2, "train.batch_size": 32}

pytestmark = pytest.mark.usefixtures("cpu_stream")


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_speed_layer_is_chosen_for_the_linux_cpu_backend_only():
    assert training.speed.available() == (sys.platform != "darwin" and mx.default_device() == mx.cpu)


def test_fast_sigmoid_matches_the_exact_sigmoid_and_its_gradient():
    x = np.concatenate([np.linspace(-100, 100, 200_001), [0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 150, -150]])
    x = mx.array(x.astype(np.float32))
    exact = 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))
    fast = np.asarray(mx.compile(kernels.fast_sigmoid)(x), dtype=np.float64)
    # float32 rounding of x * log2(e) alone makes ~4e-6 relative error at |x| ~ 87 (mx.sigmoid's too).
    normal = exact > 2.0 ** -126
    assert np.abs(fast - exact).max() <= 2e-7
    assert (np.abs(fast - exact) / exact)[normal].max() <= 5e-6
    assert fast[~normal].max() <= 2.0 ** -126  # below float32's normal range: 2**-126 or less
    grad = mx.grad(lambda x: kernels.fast_sigmoid(x).sum())(x)
    assert np.abs(np.asarray(grad) - exact * (1 - exact)).max() <= 1e-7


def test_silu_gate_matches_nn_silu_with_dropout_forward_and_backward():
    mx.random.seed(0)
    a, b, w = (mx.random.normal((64, 48)) * 4 for _ in range(3))
    keep = mx.random.bernoulli(0.8, a.shape)

    def fast(a, b):
        return (kernels.silu_gate(a, b, keep, mx.array(1 / 0.8))[0] * w).sum()

    def exact(a, b):  # nn.Dropout's arithmetic
        return (((keep * nn.silu(a)) * (1 / 0.8)) * b * w).sum()

    assert rel_err(fast(a, b), exact(a, b)) <= 1e-6
    for g_fast, g_exact in zip(mx.grad(fast, argnums=(0, 1))(a, b), mx.grad(exact, argnums=(0, 1))(a, b)):
        assert rel_err(g_fast, g_exact) <= 1e-6


@pytest.mark.parametrize("heads, length, offset", [(1, 4, 0), (4, 4, 0), (2, 2, 2), (4, 1, 3)])
def test_rope_on_reordered_features_is_nn_ropes_rotation_to_the_bit_forward_and_backward(heads, length, offset):
    """``kernels.rope`` of the features in ``rope_order``, put back in their order, equals ``nn.RoPE``
    (interleaved, base 1e6: the model's), its vjp too; eager and compiled."""
    mx.random.seed(3)
    dims, rows = 16, 5
    rope = nn.RoPE(dims, traditional=True, base=1e6)
    order, inverse = kernels.rope_order(dims, heads)
    assert mx.array_equal(inverse, mx.argsort(order)).item()
    x = mx.random.normal((rows, length, heads * dims))
    g = mx.random.normal((rows, heads, length, dims))

    def by_mlx(x):
        return rope(x.reshape(rows, length, heads, dims).transpose(0, 2, 1, 3), offset=offset)

    def by_kernel(x):
        C, S = kernels.rope_tables(rope, length, offset)
        rotated = kernels.rope(x[..., order].reshape(rows, length, heads, dims), C, S)
        return rotated.reshape(rows, length, -1)[..., inverse].reshape(rows, length, heads, dims).transpose(0, 2, 1, 3)
    for transform in (lambda f: f, mx.compile):
        assert mx.array_equal(transform(by_kernel)(x), transform(by_mlx)(x)).item()
        vjp = [transform(lambda x, g, f=f: mx.vjp(f, [x], [g])[1][0])(x, g) for f in (by_kernel, by_mlx)]
        assert mx.array_equal(*vjp).item()


def test_fast_model_rotates_positions_past_its_precomputed_tables_as_the_plain_model():
    from training.speed.model import ROPE_POSITIONS
    mx.random.seed(4)
    cfg = ModelConfig(dim=32, depth=2, heads=2)
    model = Transformer(cfg, 13)
    model.eval()
    tokens = mx.random.randint(0, 13, (3, ROPE_POSITIONS + 3))
    assert rel_err(FastModel(model, cfg)(tokens), model(tokens)) <= 1e-5


def test_permute_rows_and_its_gradient_are_the_gathers():
    w, order = mx.random.normal((6, 3)), mx.array([2, 0, 5, 1, 4, 3])
    g = mx.random.normal((6, 3))
    assert mx.array_equal(kernels.permute_rows(w, order, mx.argsort(order)), w[order]).item()
    by_kernel = mx.vjp(lambda w: kernels.permute_rows(w, order, mx.argsort(order)), [w], [g])[1][0]
    assert mx.array_equal(by_kernel, mx.vjp(lambda w: w[order], [w], [g])[1][0]).item()


@pytest.mark.parametrize("rows", [(12,), (3, 4)])
def test_linear_is_x_w_transposed_with_its_weight_gradient_laid_out_like_the_weight(rows):
    x, w, g = mx.random.normal((*rows, 6)), mx.random.normal((5, 6)), mx.random.normal((*rows, 5))
    assert mx.array_equal(kernels.linear(x, w), x @ w.T).item()
    (dx, dw), (mlx_dx, mlx_dw) = (mx.vjp(f, [x, w], [g])[1] for f in (kernels.linear, lambda x, w: x @ w.T))
    assert mx.array_equal(dx, mlx_dx).item()
    assert rel_err(dw, mlx_dw) <= 1e-6
    assert memoryview(dw).c_contiguous and not memoryview(mlx_dw).c_contiguous  # MLX's: a transposed view


@pytest.mark.parametrize("row_major", [True, False])
def test_fast_model_weight_gradients_are_row_major_unless_asked_for_mlxs(row_major):
    """What keeps the optimizers' element-wise updates on MLX's contiguous path (``kernels.linear``)."""
    cfg = ModelConfig(dim=32, depth=2, heads=2)
    model = Transformer(cfg, 13)
    fast = FastModel(model, cfg, row_major_weight_gradients=row_major)
    tokens, y = mx.random.randint(0, 13, (40, 4)), mx.random.randint(0, 13, (40,))
    grads = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(fast(tokens), y, reduction="sum"))(model)[1]
    mx.eval(grads)
    layouts = {key: memoryview(g).c_contiguous for key, g in tree_flatten(grads) if g.ndim == 2}
    linear_layers = [key for key in layouts if key != "embedding.weight"]
    assert len(linear_layers) == 7 * cfg.depth + 1  # q, k, v, o, w1, w2, w3 per block; the read-out
    # MLX's gradients are transposed views, but those of wq and wk, which reach them through permute_rows' gather.
    permuted = [key for key in linear_layers if key.endswith(("wq.weight", "wk.weight"))]
    assert all(layouts[key] == (row_major or key in permuted) for key in linear_layers), layouts
    assert layouts["embedding.weight"]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_model_gives_the_plain_models_logits_and_gradients(depth):
    """Pruned last block, per-token q/k/v (depth > 1) and fused kernels, in eval mode (no dropout)."""
    mx.random.seed(2)
    cfg = ModelConfig(dim=32, depth=depth, heads=2)
    model = Transformer(cfg, 13)
    model.eval()
    tokens, y = mx.random.randint(0, 13, (40, 4)), mx.random.randint(0, 13, (40,))
    fast = FastModel(model, cfg)
    assert rel_err(fast(tokens), model(tokens)) <= 1e-5

    def loss(forward):
        return nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(forward(tokens), y, reduction="sum"))(model)

    exact_grads = dict(tree_flatten(loss(model)[1]))
    for key, g in tree_flatten(loss(fast)[1]):
        assert rel_err(g, exact_grads[key]) <= 1e-5, key


def test_fused_and_reference_kernels_agree_with_dropout_masks():
    mx.random.seed(1)
    cfg = ModelConfig(dim=32, depth=2, heads=2)
    model = Transformer(cfg, 13)
    tokens = mx.random.randint(0, 13, (40, 4))
    fused, reference = FastModel(model, cfg), FastModel(model, cfg, fused=False, fused_rope=False)
    masks = fused.dropout_masks(40, 4)
    assert rel_err(fused(tokens, masks), reference(tokens, masks)) <= 1e-5


def test_dropout_masks_have_the_pruned_shapes_and_split_with_the_batch():
    cfg = ModelConfig(dim=16, depth=3, heads=2, dropout=0.3)
    model = Transformer(cfg, 11)
    fast = FastModel(model, cfg)
    tokens = mx.random.randint(0, 11, (9, 4))
    masks = fast.dropout_masks(9, 4)
    assert [m.shape for m in masks] == [(9, 4, 64), (9, 4, 64), (9, 1, 64)]
    whole = fast(tokens, masks)
    rows = [fast(tokens[:5], [m[:5] for m in masks]), fast(tokens[5:], [m[5:] for m in masks])]
    assert rel_err(mx.concatenate(rows), whole) <= 1e-6
    model.eval()
    assert fast.dropout_masks(9, 4) is None
    model.train()
    assert FastModel(model, ModelConfig(dim=16, depth=3, heads=2, dropout=0.0)).dropout_masks(9, 4) is None


def sgd_step(trainer, x, y):
    """Parameters before and after one step of ``trainer`` with SGD(lr=1): their difference is the gradient."""
    before = dict(tree_flatten(trainer.model.parameters()))
    mx.eval(before)
    loss, correct = trainer.step(x, y)
    mx.eval(trainer.state, loss, correct)
    after = dict(tree_flatten(trainer.model.parameters()))
    return {k: before[k] - after[k] for k in before}, loss.item(), correct.item()


@pytest.mark.parametrize("rows", [32, 7])  # a full batch and an odd partial one (parts of 4 and 3 rows)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_split_step_gradient_equals_the_whole_batch_and_the_plain_step(rows, dropout):
    cfg = override(Config(), {**SMALL, "model.dropout": dropout}).resolved()
    x_train, y_train, _, _ = data.split(cfg.data, np.random.default_rng(0))
    x, y = mx.array(x_train[:rows]), mx.array(y_train[:rows])
    split = sgd_step(FastTrainer(cfg, optim.SGD(learning_rate=1.0)), x, y)
    whole = sgd_step(FastTrainer(cfg, optim.SGD(learning_rate=1.0), streams=1), x, y)
    assert split[0].keys() == whole[0].keys()
    for name in whole[0]:
        assert rel_err(split[0][name], whole[0][name]) <= 1e-5, name
    assert split[1] == pytest.approx(whole[1], rel=1e-5) and split[2] == whole[2]
    if dropout == 0:  # the plain Trainer (its own dropout masks otherwise)
        exact = sgd_step(plain.Trainer(cfg, optim.SGD(learning_rate=1.0)), x, y)
        for name in exact[0]:
            assert rel_err(split[0][name], exact[0][name]) <= 1e-5, name
        assert split[1] == pytest.approx(exact[1], rel=1e-5) and split[2] == exact[2]


def test_fast_trainer_follows_the_plain_trainer_without_dropout():
    cfg = override(Config(), {**SMALL, "model.dropout": 0.0, "optim.lr": 3e-3}).resolved()
    x_train, y_train, x_val, y_val = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    order = mx.array(np.random.default_rng(1).permutation(len(y_train)))
    results = []
    for trainer in (FastTrainer(cfg), plain.Trainer(cfg)):
        losses = [trainer.steps(x_train, y_train, order, 32)[0].item() for _ in range(3)]
        results.append((losses, [v.item() for v in trainer.evaluator(x_val, y_val)()]))
    (fast_losses, fast_eval), (plain_losses, plain_eval) = results
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
    assert fast_eval[0] == pytest.approx(plain_eval[0], rel=1e-4)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_logits_after_shared_prefixes_equal_the_whole_sequences(length):
    mx.random.seed(4)
    cfg = ModelConfig(dim=32, depth=3, heads=2)
    model = Transformer(cfg, 13)
    model.eval()
    fast = FastModel(model, cfg)
    tokens = mx.random.randint(0, 13, (50, 4))
    prefixes, inverse = np.unique(np.asarray(tokens[:, :length]), axis=0, return_inverse=True)
    past = fast.prefix_keys_values(mx.array(prefixes))
    inverse = mx.array(inverse.reshape(-1))
    logits = fast.logits_after(tokens[:, length:], [(k[inverse], v[inverse]) for k, v in past])
    assert rel_err(logits, model(tokens)) <= 1e-5


def test_shared_prefixes_picks_the_cheapest_split():
    cfg = override(Config(), {"data.p": 23}).resolved()
    _, _, x_val, _ = data.split(cfg.data, np.random.default_rng(0))
    length, prefixes, inverse = shared_prefixes(x_val)
    assert length == 2 and len(prefixes) <= 23  # "a op"
    assert np.array_equal(prefixes[inverse], x_val[:, :2])
    assert shared_prefixes(np.arange(40).reshape(10, 4)) is None  # nothing shared


def test_evaluation_on_streams_and_shared_prefixes_equals_the_plain_evaluation(monkeypatch):
    cfg = override(Config(), {**SMALL, "data.p": 47}).resolved()
    _, _, x_val, y_val = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    monkeypatch.setattr(plain, "EVAL_CHUNK", 256)
    monkeypatch.setattr("training.speed.trainer.EVAL_CHUNK", 256)
    assert len(y_val) > 2 * 256  # several chunks per stream
    fast = [v.item() for v in FastTrainer(cfg).evaluator(x_val, y_val)()]
    exact = [v.item() for v in plain.Trainer(cfg).evaluator(x_val, y_val)()]
    assert fast[0] == pytest.approx(exact[0], rel=1e-5)
    assert fast[1] == exact[1]


def test_an_epoch_equals_its_steps_one_by_one():
    """``FastTrainer.steps`` draws each batch's masks a step ahead (on a stream of their own): same result."""
    cfg = override(Config(), {**SMALL, "data.p": 23}).resolved()
    x_train, y_train, _, _ = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    order = mx.array(np.random.default_rng(1).permutation(len(y_train))[:80])  # batches of 32, 32, 16
    by_epoch, by_step = FastTrainer(cfg), FastTrainer(cfg)
    mx.random.seed(5)
    loss, correct = by_epoch.steps(x_train, y_train, order, cfg.train.batch_size)
    mx.eval(by_epoch.state, loss, correct)
    mx.random.seed(5)
    totals = [by_step.step(x_train[order[i:i + 32]], y_train[order[i:i + 32]]) for i in range(0, 80, 32)]
    mx.eval(by_step.state, totals)
    assert loss.item() == pytest.approx(sum(t[0].item() for t in totals), rel=1e-6)
    assert correct.item() == sum(t[1].item() for t in totals)
    for (name, a), (_, b) in zip(tree_flatten(by_epoch.model.parameters()), tree_flatten(by_step.model.parameters())):
        assert rel_err(a, b) <= 1e-6, name


def test_first_block_qkv_looked_up_per_token_equals_the_projections_logits_and_gradients():
    """``FastModel.first_qkv`` (tables per token, one-hot matmul gradient) vs the per-position path."""
    mx.random.seed(4)
    cfg = ModelConfig(dim=32, depth=2, heads=2)
    model = Transformer(cfg, 13)
    tokens = mx.random.randint(0, 13, (40, 4))
    y = mx.random.randint(0, 13, (40,))
    looked_up, projected = FastModel(model, cfg), FastModel(model, cfg, lookup_first_qkv=False)
    masks = looked_up.dropout_masks(40, 4)

    def run(fast):
        loss = lambda m: nn.losses.cross_entropy(fast(tokens, masks), y, reduction="sum")
        return fast(tokens, masks), nn.value_and_grad(model, loss)(model)[1]

    (fast, fast_grads), (exact, exact_grads) = run(looked_up), run(projected)
    assert rel_err(fast, exact) <= 1e-5
    exact_grads = dict(tree_flatten(exact_grads))
    for key, g in tree_flatten(fast_grads):
        assert rel_err(g, exact_grads[key]) <= 1e-5, key
    model.eval()
    past = looked_up.prefix_keys_values(tokens[:, :2])
    assert rel_err(looked_up.logits_after(tokens[:, 2:], past), projected.logits_after(tokens[:, 2:], past)) <= 1e-5


SUBNORMAL_PROBE = """
import fastblas, mlx.core as mx
from config import Config, override
from training.speed.trainer import FastTrainer
tiny = mx.array([1e-38, 3.0], dtype=mx.float32)  # 1e-38 * 0.5 is subnormal; 3 * 0.5 is not
before = (tiny * 0.5).tolist()
trainer = FastTrainer(override(Config(), {"data.p": 11, "model.dim": 32, "model.heads": 2}))
with mx.stream(trainer.streams[0]):
    after = (tiny * 0.5).tolist()
print(before[0] > 0, before[1], after[0], after[1])
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="flush-to-zero is set on x86-64 Linux only")
def test_fast_trainer_flushes_subnormals_on_its_streams_and_leaves_normal_values_alone():
    # A fresh interpreter: the floating-point mode is per thread and inherited, so this process may have it set.
    probe = subprocess.run([sys.executable, "-c", SUBNORMAL_PROBE], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parent.parent)
    assert probe.stdout.split() == ["True", "1.5", "0.0", "1.5"]


KERNEL_BUILD_PROBE = """
import hashlib, os, sys
import fastblas
from training.speed.compiler import build_kernels_for_this_cpu
built = build_kernels_for_this_cpu() if sys.argv[1] == "native" else False
import mlx.core as mx
from training.speed import kernels
a, b = mx.random.normal((64, 257), key=mx.random.key(1)), mx.random.normal((64, 257), key=mx.random.key(2))
keep = mx.random.bernoulli(0.8, (64, 257), key=mx.random.key(3))
def loss(a, b):
    return (kernels.silu_gate(a, b, keep, mx.array(1.25))[0] * a).sum() + kernels.fast_sigmoid(b).sum()
outputs = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))(a, b)
mx.eval(outputs)
digest = hashlib.sha256(b"".join(bytes(memoryview(x)) for x in [outputs[0], *outputs[1]])).hexdigest()
print(built, digest, any("mlx-kernels-" in line and ".so" in line for line in open("/proc/self/maps")))
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64")
                    or shutil.which("g++") is None, reason="kernels are built for the CPU on x86-64 Linux with g++")
def test_kernels_built_for_this_cpu_are_loaded_and_compute_the_same_bits():
    # Fresh interpreters: the compiler wrapper and kernel cache are per process, and inherited, so the
    # probes get the environment without those of any FastTrainer this process built.
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR" or "mlx-kernels-" not in v}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "mlx-kernels-" not in p)

    def probe(kind):
        done = subprocess.run([sys.executable, "-c", KERNEL_BUILD_PROBE, kind], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent.parent, env=env)
        return done.stdout.split()
    native, baseline = probe("native"), probe("baseline")
    assert native[0] == "True" and native[2] == "True"  # the kernels came from the CPU-specific cache
    assert baseline[0] == "False" and baseline[2] == "False"
    assert native[1] == baseline[1]


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64")
                    or shutil.which("g++") is None, reason="kernels are built for the CPU on x86-64 Linux with g++")
def test_a_child_process_reuses_the_kernel_build_it_inherits(tmp_path, monkeypatch):
    from training.speed import compiler
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])  # both restored after the test
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR afresh, as a new process does
    assert compiler.build_kernels_for_this_cpu()
    inherited = dict(os.environ)
    assert Path(inherited["TMPDIR"]).parent == tmp_path and (Path(inherited["TMPDIR"]) / "bin" / "g++").exists()
    monkeypatch.setattr(tempfile, "tempdir", None)  # a sweep worker started from here: same wrapper and cache
    assert compiler.build_kernels_for_this_cpu() and dict(os.environ) == inherited


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64")
                    or shutil.which("g++") is None, reason="kernels are built for the CPU on x86-64 Linux with g++")
def test_ray_keeps_the_temporary_directory_the_kernel_cache_displaced(tmp_path, monkeypatch):
    """Ray's sockets under the kernel cache's directory went past AF_UNIX's 107 bytes with a TMPDIR of 24."""
    from training.speed import compiler
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("RAY_TMPDIR", "")  # restored after the test
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert compiler.build_kernels_for_this_cpu()
    assert os.environ["RAY_TMPDIR"] == str(tmp_path) and Path(os.environ["TMPDIR"]).parent == tmp_path
    monkeypatch.setenv("RAY_TMPDIR", "/elsewhere")  # one that was set stays as it is
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert compiler.build_kernels_for_this_cpu() and os.environ["RAY_TMPDIR"] == "/elsewhere"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64")
                    or shutil.which("g++") is None, reason="kernels are built for the CPU on x86-64 Linux with g++")
def test_flags_the_compiler_refuses_leave_mlxs_own_build(tmp_path, monkeypatch):
    from training.speed import compiler
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(tempfile, "tempdir", None)
    before = dict(os.environ)
    assert not compiler.build_kernels_for_this_cpu(flags=("--no-such-flag",))
    assert dict(os.environ) == before and not list(tmp_path.glob("mlx-kernels-*/bin/g++*"))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updates_spread_over_the_streams_give_the_bits_of_one_stream(name):
    """Every registered optimizer (QUAD's groups, the others' parameters, Muon's two optimizers): three steps with the
    updates on the trainer's two streams and on the default one give the same parameters and state, to the bit."""
    cfg = override(Config(), {**SMALL, "optim.name": name}).resolved()
    x_train, y_train, _, _ = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    order = mx.array(np.random.default_rng(1).permutation(len(y_train))[:96])
    trainers = [FastTrainer(cfg, spread_updates=spread) for spread in (True, False)]
    for trainer in trainers:
        mx.random.seed(5)
        mx.eval(trainer.steps(x_train, y_train, order, cfg.train.batch_size), trainer.state)
    spread, single = (dict(tree_flatten([t.model.parameters(), t.optimizer.state])) for t in trainers)
    assert spread.keys() == single.keys()
    for key, a in spread.items():
        assert mx.array_equal(a, single[key]).item(), key


def test_updates_on_streams_puts_each_shape_on_one_stream_the_largest_first_on_the_least_loaded():
    streams = [mx.new_stream(mx.cpu) for _ in range(2)]
    # classes: (3,) x 3 = 9 elements, (8,) = 8, (5,) = 5 (two dtypes: two classes), (4,) = 4
    parameters = {"a": mx.zeros((8,)), "b": mx.zeros((5,)), "c": mx.zeros((4,)), "d": mx.zeros((3,)),
                  "e": mx.zeros((3,)), "f": mx.zeros((3,)), "g": mx.zeros((5,), mx.float16)}
    stranger = mx.zeros((2,))  # not in the tree: stays on the stream in use
    optimizer = optim.MultiOptimizer([optim.SGD(0.1), optim.Adam(0.1)], [lambda path, p: path in ("a", "c")])
    seen = {}

    def record(optimizer):
        def apply_single(gradient, parameter, state):
            seen[id(parameter)] = mx.default_stream(mx.cpu)
            return parameter
        return apply_single
    for inner in optimizer.optimizers:  # the instances' own, which the block must restore
        inner.apply_single = record(inner)
    before = [inner.apply_single for inner in optimizer.optimizers]
    with updates_on_streams(optimizer, parameters, streams):
        grads = {k: mx.ones_like(v) for k, v in parameters.items()}
        optimizer.apply_gradients(grads, parameters)
        optimizer.optimizers[0].apply_single(mx.ones((2,)), stranger, {})
    # the (3,)s -> first stream (9), 8 -> second, the float32 5 -> second (8 < 9), the float16 5 -> first (9 < 13),
    # 4 -> second (13 < 14)
    first, second = streams
    expected = {"a": second, "b": second, "c": second, "d": first, "e": first, "f": first, "g": first}
    assert {k: seen[id(v)] for k, v in parameters.items()} == expected
    assert seen[id(stranger)] == mx.default_stream(mx.cpu)
    assert [inner.apply_single for inner in optimizer.optimizers] == before
    plain = optim.SGD(0.1)  # the class's method: no instance attribute left behind
    with updates_on_streams(plain, parameters, streams):
        assert "apply_single" in vars(plain)
    assert "apply_single" not in vars(plain)
