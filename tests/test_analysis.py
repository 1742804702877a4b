"""Tests for the progress-measure analysis (analysis/): group maths, Fourier basis, Gini, key-frequency rule,
the logit projections on hand-built Fourier-algorithm logits, and a run directory end to end."""
import json
import math

import mlx.core as mx
import numpy as np
import pytest

import data
import models
from analysis import fourier
from analysis.__main__ import main
from analysis.group import build_group, discrete_log_table, primitive_root
from analysis.measures import ROW_KEYS, build_grid, logit_measures, weight_measures
from analysis.run import FIGURES, SUMMARY_KEYS
from analysis.synthetic import make_synthetic_run

PRIMES = (2, 3, 5, 7, 11, 13, 23, 97, 101)


def order(g, p):
    x, k = g % p, 1
    while x != 1:
        x, k = x * g % p, k + 1
    return k


@pytest.mark.parametrize("p", PRIMES)
def test_primitive_root_has_order_p_minus_1_and_is_the_smallest(p):
    g = primitive_root(p)
    assert order(g, p) == p - 1
    assert all(order(h, p) < p - 1 for h in range(2, g))


def test_primitive_roots_of_known_primes_and_composites_rejected():
    assert [primitive_root(p) for p in (7, 23, 41, 97)] == [3, 5, 6, 5]  # textbook values
    for p in (1, 9, 12):
        with pytest.raises(ValueError, match="not prime"):
            primitive_root(p)
    with pytest.raises(ValueError, match="not prime"):
        build_group(9, "*")
    with pytest.raises(ValueError, match="unknown op"):
        build_group(7, "^")
    assert build_group(10, "+").n == 10  # + and - need no prime


@pytest.mark.parametrize("p", (3, 7, 23, 97))
def test_discrete_log_is_a_bijection_turning_mul_and_div_into_add_and_sub(p):
    g = primitive_root(p)
    log = discrete_log_table(p, g)
    assert log[0] == -1 and sorted(log[1:]) == list(range(p - 1))
    a, b = (m.ravel() for m in np.meshgrid(np.arange(1, p), np.arange(1, p), indexing="ij"))
    inv_b = np.array([pow(int(x), p - 2, p) for x in b])
    assert (log[a * b % p] == (log[a] + log[b]) % (p - 1)).all()
    assert (log[a * inv_b % p] == (log[a] - log[b]) % (p - 1)).all()
    assert (np.array([pow(g, int(i), p) for i in log[1:]]) == np.arange(1, p)).all()
    for op in ("*", "/"):
        group = build_group(p, op)
        assert (group.residue_of[group.index_of[1:]] == np.arange(1, p)).all()
        tokens, labels = data.modular_arithmetic(data.DataConfig(p=p, op=op))
        keep = (tokens[:, 0] != 0) & (tokens[:, 2] != 0)
        i, j = group.index_of[tokens[keep, 0]], group.index_of[tokens[keep, 2]]
        assert (group.residue_of[group.combine(i, j)] == labels[keep]).all()


@pytest.mark.parametrize("n", (1, 2, 5, 6, 22, 23, 96, 97))
def test_fourier_basis_is_orthonormal_with_a_nyquist_row_for_even_sizes(n):
    F, freq = fourier.fourier_basis(n)
    assert F.shape == (n, n)
    np.testing.assert_allclose(F @ F.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(F.T @ F, np.eye(n), atol=1e-12)
    counts = np.bincount(freq)
    assert counts[0] == 1 and (counts[1:(n + 1) // 2] == 2).all()
    if n % 2 == 0 and n > 1:
        assert freq[-1] == n // 2 and counts[n // 2] == 1
        np.testing.assert_allclose(F[-1], (-1.0) ** np.arange(n) / np.sqrt(n))
    np.testing.assert_allclose(F[0], np.full(n, n ** -0.5))
    if n > 2:  # row 1 is cos(2πx/n), row 2 sin(2πx/n), both scaled by √(2/n)
        x = np.arange(n)
        np.testing.assert_allclose(F[1:3], np.sqrt(2 / n) * np.stack([np.cos(2 * np.pi * x / n),
                                                                       np.sin(2 * np.pi * x / n)]), atol=1e-12)


def test_gini_flat_is_zero_one_hot_is_near_one_and_matches_the_pairwise_definition():
    assert abs(fourier.gini(np.full(48, 3.0))) < 1e-12
    one_hot = np.zeros(48)
    one_hot[7] = 2.5
    assert fourier.gini(one_hot) == pytest.approx(47 / 48, abs=1e-12)
    assert fourier.gini([0, 0, 1, 1]) == pytest.approx(0.5)
    v = np.random.default_rng(0).random(31)
    pairwise = np.abs(v[:, None] - v[None]).mean() / (2 * v.mean())
    assert fourier.gini(v) == pytest.approx(pairwise, rel=1e-12)
    assert fourier.gini(7 * v) == pytest.approx(fourier.gini(v), rel=1e-12)
    assert fourier.gini(np.zeros(5)) == 0.0


def test_key_frequency_rule_takes_the_peaks_over_twice_the_median_largest_first_capped():
    floor = np.full(20, 0.1)
    peaks = floor.copy()
    peaks[[2, 8, 15]] = [0.5, 0.9, 0.21]  # frequencies 3, 9, 16; the median stays 0.1
    keys, share = fourier.key_frequencies(peaks, 2.0, 8)
    assert keys == [3, 9, 16] and share == pytest.approx((0.25 + 0.81 + 0.21 ** 2) / (peaks ** 2).sum())
    assert fourier.key_frequencies(peaks, 2.0, 2)[0] == [3, 9]  # the cap keeps the largest
    assert fourier.key_frequencies(peaks, 3.0, 8)[0] == [3, 9]  # 0.21 is not 3x the median
    assert fourier.key_frequencies(floor, 2.0, 8) == ([], 0.0)  # a flat spectrum has no key frequency
    assert fourier.key_frequencies(np.zeros(4), 2.0, 3) == ([], 0.0)


def make_grid(p, op, seed=0):
    cfg = data.DataConfig(p=p, op=op, train_fraction=0.5)
    tokens, labels = data.modular_arithmetic(cfg)
    x_train = data.split(cfg, np.random.default_rng([seed, 0]))[0]
    return build_grid(build_group(p, op), tokens, labels, x_train), x_train


KEYS, ALPHAS = (2, 5, 9), (6.0, 4.0, 5.0)


def fourier_algorithm_logits(grid):
    """Logits ``Σ_k α_k cos(2πk(z − c)/n)`` over the group's answer columns, −30 on the other tokens."""
    g = grid.group
    logits = np.full((len(grid.z), g.p + 2), -30.0)
    c = np.arange(g.n)
    logits[:, g.residue_of] = sum(a * np.cos(2 * np.pi * k * (grid.z[:, None] - c[None]) / g.n)
                                  for k, a in zip(KEYS, ALPHAS))
    return logits


@pytest.mark.parametrize("p, op", [(23, "+"), (23, "-"), (23, "*"), (23, "/"), (24, "+")])
def test_fourier_algorithm_logits_give_their_frequencies_and_the_paper_losses(p, op):
    grid, _ = make_grid(p, op)
    n = grid.group.n
    out = logit_measures(fourier_algorithm_logits(grid), grid, KEYS)
    amplitudes = np.array(out["logit_amplitudes"])
    expected = np.zeros(n // 2)
    expected[np.array(KEYS) - 1] = ALPHAS
    np.testing.assert_allclose(amplitudes, expected, atol=1e-9)
    assert fourier.key_frequencies(amplitudes, 2.0, 8)[0] == list(KEYS)
    assert out["acc_all"] == 1.0 and out["loss_all"] < 0.05
    for split in ("train", "all"):  # the algorithm lives in the kept directions, and only there
        assert out[f"restricted_loss_{split}"] == pytest.approx(out[f"loss_{split}"], rel=1e-9)
        assert out[f"excluded_loss_{split}"] == pytest.approx(math.log(n), abs=1e-9)  # uniform: chance
    assert abs(out["excluded_loss_train"] - math.log(p)) <= math.log(p / (p - 1)) + 1e-9
    assert out["restricted_acc_all"] == 1.0

    # An embedding made of the same frequencies (plus a little noise) gives them back as key frequencies.
    rng = np.random.default_rng(1)
    x = np.arange(n)[:, None]
    embedding = 1e-3 * rng.standard_normal((p + 2, 16))
    embedding[grid.group.residue_of] += sum(np.cos(2 * np.pi * k * x / n) * rng.standard_normal(16)
                                            + np.sin(2 * np.pi * k * x / n) * rng.standard_normal(16)
                                            for k in KEYS)
    w = weight_measures({"embedding.weight": embedding, "out.weight": rng.standard_normal((p + 2, 16))},
                        grid.group)
    assert fourier.key_frequencies(w["embed_norms"], 2.0, 8)[0] == list(KEYS)
    assert w["embed_gini"] > 0.65  # 3 of 11 frequencies equally loaded would give 8/11


def test_projections_are_orthogonal_and_excluded_plus_key_part_is_the_logits():
    grid, _ = make_grid(13, "/")
    n, z = grid.group.n, grid.z
    L = np.random.default_rng(2).standard_normal((len(z), 15))
    means = fourier.answer_means(L, z, n)
    P = fourier.project_answer_frequencies(means, z, n, (1, 4), constant=True)
    assert abs((P * (L - P)).sum()) < 1e-9  # residual orthogonal to the projection
    again = fourier.project_answer_frequencies(fourier.answer_means(P, z, n), z, n, (1, 4), constant=True)
    np.testing.assert_allclose(again, P, atol=1e-12)  # idempotent
    all_freqs = range(1, n // 2 + 1)  # every function of z: the per-answer means themselves
    np.testing.assert_allclose(fourier.project_answer_frequencies(means, z, n, all_freqs, True), means[z],
                               atol=1e-12)
    const = fourier.project_answer_frequencies(means, z, n, (), constant=True)
    np.testing.assert_allclose(const, np.broadcast_to(L.mean(axis=0), L.shape), atol=1e-12)


@pytest.mark.parametrize("op", ("+", "/", "*"))
def test_grid_marks_exactly_the_training_pairs_of_the_seeded_split(op):
    grid, x_train = make_grid(23, op, seed=5)
    train_pairs = {(a, b) for a, _, b, _ in x_train.tolist()}
    grid_pairs = [(a, b) for a, _, b, _ in grid.tokens.tolist()]
    assert [pair in train_pairs for pair in grid_pairs] == grid.is_train.tolist()
    outside = 0 if op == "+" else sum(a == 0 or b == 0 for a, b in train_pairs)
    assert grid.is_train.sum() == len(train_pairs) - outside


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A p = 23 ÷ run of a tiny model: 4 snapshots of seeded random weights, analysed once."""
    run = make_synthetic_run(tmp_path_factory.mktemp("run") / "r", p=23, op="/", dim=16, depth=2, mlp_ratio=2,
                             snapshots=4, epochs_per_snapshot=3, steps_per_epoch=2, seed=3)
    assert main([str(run)]) == 0
    return run


def test_analysis_of_a_small_run_writes_every_file_with_the_documented_keys(small_run):
    rows = [json.loads(line) for line in (small_run / "analysis.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(tuple(r) == ROW_KEYS for r in rows)
    assert [r["step"] for r in rows] == [6, 12, 18, 24] and [r["epoch"] for r in rows] == [3, 6, 9, 12]
    assert all(len(r[k]) == 11 for r in rows for k in ("embed_norms", "unembed_norms", "logit_amplitudes"))
    summary = json.loads((small_run / "analysis.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["group"]["primitive_root"] == 5 and summary["group"]["order"] == 22
    assert summary["pairs"]["grid"] == 22 * 22 and summary["frequencies"] == list(range(1, 12))
    assert len(summary["key_frequencies"]) <= 8 and summary["snapshots"] == 4
    assert set(summary["phases"]) == {"level", "train_acc_99_epoch", "val_acc_99_epoch", "val_loss_below_level_epoch",
                                      "restricted_loss_below_level_epoch", "restricted_loss_min_epoch",
                                      "excluded_loss_train_peak_epoch", "sum_sq_weights_peak_epoch"}
    figures = [f"{name}{dark}.png" for name in FIGURES for dark in ("", "_dark")]
    assert summary["files"] == ["analysis.jsonl", "analysis.json"] + figures
    for name in summary["files"]:
        assert (small_run / name).stat().st_size > 0
    for name in figures:
        assert (small_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(small_run.glob("*.tmp*"))


def test_measures_of_a_snapshot_match_an_independent_eager_forward(small_run):
    """The compiled forward reuses one trace across snapshots: each row must see its own weights."""
    cfg = json.loads((small_run / "config.json").read_text())
    grid, _ = make_grid(23, "/", seed=cfg["seed"])
    rows = [json.loads(line) for line in (small_run / "analysis.jsonl").read_text().splitlines()]
    for row in (rows[0], rows[-1]):
        arrays = mx.load(str(small_run / "snapshots" / f"step_{row['step']:09d}.safetensors"))
        model = models.Transformer(models.ModelConfig(**cfg["model"]), 25)
        model.load_weights(list(arrays.items()))
        model.eval()
        logits = np.array(model(mx.array(grid.tokens)))
        loss, correct = fourier.token_losses(logits, grid.labels)
        assert row["loss_all"] == pytest.approx(loss.mean(), rel=1e-5)
        assert row["loss_train"] == pytest.approx(loss[grid.is_train].mean(), rel=1e-5)
        params = {k: np.array(v) for k, v in arrays.items()}
        assert row["sum_sq_weights"] == pytest.approx(sum((v.astype(np.float64) ** 2).sum()
                                                          for v in params.values()), rel=1e-9)
    assert rows[0]["sum_sq_weights"] > rows[-1]["sum_sq_weights"]  # the synthetic snapshots shrink


def write_config(run, **data_cfg):
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"data": {"p": 7, "op": "+", "train_fraction": 0.5} | data_cfg,
           "model": {"dim": 8, "depth": 1, "heads": 1, "dropout": 0.0, "mlp_ratio": 1}, "optim": {}, "train": {},
           "seed": 0}
    (run / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"), ("no_config", "no config.json"), ("no_snapshots", "no snapshots"),
    ("unknown_op", "not supported"), ("composite_mul", "not prime"), ("wrong_shape", "does not fit"),
    ("bad_factor", "factor"),
])
def test_bad_input_prints_one_error_line_and_exits_2(tmp_path, capsys, case, message):
    run, argv = tmp_path / "run", []
    if case == "no_config":
        run.mkdir()
    elif case == "unknown_op":
        write_config(run, op="^")
    elif case == "composite_mul":
        write_config(run, p=9, op="*")
    elif case in ("no_snapshots", "bad_factor"):
        write_config(run)
        argv = ["--factor", "0.5"] if case == "bad_factor" else []
    elif case == "wrong_shape":
        make_synthetic_run(run, p=7, op="+", dim=8, depth=1, mlp_ratio=1, snapshots=1)
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["dim"] = 16
        (run / "config.json").write_text(json.dumps(cfg))
    assert main([str(run)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_snapshot_without_metadata_takes_its_step_from_the_name_and_its_epoch_from_the_metrics(tmp_path):
    run = make_synthetic_run(tmp_path / "r", p=7, op="-", dim=8, depth=1, mlp_ratio=1, snapshots=2,
                             epochs_per_snapshot=1, steps_per_epoch=3)
    path = run / "snapshots" / "step_000000006.safetensors"
    mx.save_safetensors(str(path), mx.load(str(path)))  # the same weights, no metadata
    assert main([str(run), "--no-figures"]) == 0
    rows = [json.loads(line) for line in (run / "analysis.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 3), (2, 6)]
    assert sorted(p.name for p in run.iterdir()) == ["analysis.json", "analysis.jsonl", "config.json",
                                                       "metrics.jsonl", "snapshots"]


def test_a_snapshot_taken_between_epochs_keeps_its_fractional_epoch(tmp_path):
    from analysis.run import load_snapshot
    from training.checkpoints import save_snapshot
    model = models.Transformer(models.ModelConfig(dim=16, depth=1, heads=1), 9)
    path = save_snapshot(tmp_path, model, 0.1, 1)
    assert load_snapshot(path, 1, [])[1:] == (0.1, 1)
    assert load_snapshot(save_snapshot(tmp_path, model, 3.0, 30), 30, [])[1:] == (3, 30)
