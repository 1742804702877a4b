"""The dropout masks drawn by native code (``training/speed/masks.py``) are ``mx.random.bernoulli``'s, bit for bit,
and leave ``mx.random.state`` where MLX's draws leave it; a trainer drawing them follows one drawing MLX's; without
a compiler the masks come from MLX."""
import functools
import shutil
import sys
import tempfile

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import data
from config import Config, override
from training.speed import compiler, masks
from training.speed.masks import NativeMasks
from training.speed.trainer import FastTrainer

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                               reason="the masks are built with g++ on Linux"),
              pytest.mark.usefixtures("cpu_stream")]


@pytest.fixture(scope="module")
def native():
    generator = NativeMasks.build()
    assert generator is not None
    return generator


@pytest.mark.parametrize("keys", [1, 2, 3, 501])
def test_bits_equal_mlx_random_split(native, keys):
    # split(key, k) is bits((k, 2), key), the one way Python reaches bits; odd sizes: the bernoulli tests below.
    key = mx.random.key(3)
    assert np.array_equal(native.bits(np.array(key), 2 * keys), np.array(mx.random.split(key, keys)).reshape(-1))


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (7, 5), (3, 4, 33), (64, 4, 512)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_masks_and_the_state_after_them_equal_mlx_bernoulli(native, shape, p):
    mx.random.seed(11)
    expected = [np.array(mx.random.bernoulli(p, shape)) for _ in range(2)]
    key = np.array(mx.random.state[0])
    mx.random.seed(11)
    drawn = native.draw(p, [shape, shape])
    assert np.array_equal(np.array(mx.random.state[0]), key)  # the keys are taken at once, in order
    got = drawn()
    assert all(m.dtype == mx.bool_ and m.shape == shape for m in got)
    for a, b in zip(got, expected):
        assert np.array_equal(np.array(a), b)


def test_a_mask_too_large_for_mlxs_counters_is_refused_before_any_key_is_taken(native):
    key = np.array(mx.random.state[0])
    with pytest.raises(ValueError, match=r"fewer than 2\*\*32"):
        native.draw(0.5, [(2 ** 16, 2 ** 16)])
    assert np.array_equal(np.array(mx.random.state[0]), key)


SMALL = {"data.p": 23, "model.dim": 32, "model.heads": 2, "train.batch_size": 32, "model.dropout": 0.3}


def train_two_epochs(native_masks: bool):
    cfg = override(Config(), SMALL).resolved()
    x, y, _, _ = map(mx.array, data.split(cfg.data, np.random.default_rng(0)))
    order = mx.array(np.random.default_rng(1).permutation(len(y)))
    trainer = FastTrainer(cfg, native_masks=native_masks)
    totals = [trainer.steps(x, y, order, cfg.train.batch_size) for _ in range(2)]
    mx.eval(trainer.state, totals)
    return trainer, [t[0].item() for t in totals], dict(tree_flatten(trainer.model.parameters()))


def test_a_trainer_drawing_native_masks_follows_one_drawing_mlxs():
    by_mlx, mlx_losses, mlx_parameters = train_two_epochs(native_masks=False)
    key = np.array(mx.random.state[0])
    by_native, native_losses, native_parameters = train_two_epochs(native_masks=True)
    assert by_mlx.native_masks is None and by_native.native_masks is not None
    assert native_losses == mlx_losses
    assert np.array_equal(np.array(mx.random.state[0]), key)
    for name, value in mlx_parameters.items():
        assert mx.array_equal(native_parameters[name], value).item(), name


def test_without_a_compiler_the_trainer_draws_mlxs_masks(monkeypatch):
    monkeypatch.setattr(compiler, "real_compiler", lambda: None)
    monkeypatch.setattr(masks, "load_library", functools.lru_cache(masks.load_library.__wrapped__))
    assert NativeMasks.build() is None
    trainer = FastTrainer(override(Config(), SMALL).resolved())
    assert trainer.native_masks is None
    loss, correct = trainer.step(mx.zeros((8, 4), mx.int32), mx.zeros((8,), mx.int32))
    assert np.isfinite(loss.item())


def test_the_library_is_built_once_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    library = compiler.build_library(masks.SOURCE)
    assert library is not None and library.parent == tmp_path
    built = library.stat().st_mtime_ns
    assert compiler.build_library(masks.SOURCE) == library and library.stat().st_mtime_ns == built
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    assert compiler.build_library(broken) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([library.name, broken.name])
