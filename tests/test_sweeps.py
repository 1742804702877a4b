"""Sweeps: grids, validation, naming, resumable runs, the results table, censoring, figures, fairness."""
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

import data
import models
from config import Config, flatten, flatten_dict, override
from optimizers import OPTIMIZERS
from sweeps import executors, results, spec as spec_module
from sweeps.__main__ import main_cli, parse_sweep_args
from sweeps.results import summarize
from sweeps.spec import Spec, apply_axes, default_spec, expand
from training.loop import train
from training.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--p", "7", "--op", "+", "--dim", "16", "--depth", "1", "--batch-size", "32", "--epochs", "3"]


def n_used(name: str, grid: dict) -> int:
    """Points of ``grid`` for optimizer ``name``: the product over the axes it uses."""
    return math.prod(len(v) for k, v in grid.items() if spec_module.uses(name, k))


# ---------------------------------------------------------------------------------------------
# Grids

def test_default_optimizer_sweep_runs_each_optimizer_over_its_own_search_space():
    from sweeps import optimizers as spec_data
    runs = expand(default_spec("optimizers"))
    spaces = {name: entry.search_space() for name, entry in OPTIMIZERS.items()}
    assert len(runs) == sum(math.prod(map(len, s.values())) for s in spaces.values()) * len(spec_data.SEEDS)
    for name, space in spaces.items():
        mine = [flatten(r.config) for r in runs if r.config.optim.name == name]
        for key, values in space.items():
            assert sorted({row[key] for row in mine}) == sorted(values), (name, key)
    for run in runs:
        cfg = run.config
        assert (cfg.data.train_fraction, cfg.train.epochs, cfg.train.early_stop_val_acc) == (0.4, 400, 0.9)
        knobs = OPTIMIZERS[cfg.optim.name].hyperparameters
        assert all((getattr(cfg.optim, k) is None) == (k not in knobs) for k in ("beta2", "momentum"))


def test_dry_run_lists_each_optimizers_own_grid(capsys):
    assert main_cli(["optimizers", "--dry-run", "--seeds", "0"]) == 0
    listing = capsys.readouterr().out
    for name, entry in OPTIMIZERS.items():
        n = math.prod(len(v) for v in entry.search_space().values())
        assert sum(line.split()[1].startswith(name + "_") for line in listing.splitlines()[:-1]) == n, name


def test_default_architecture_sweep_varies_one_knob_at_a_time_around_the_center():
    from sweeps import architecture as spec_data
    runs = expand(default_spec("architecture"))
    points = 1 + sum(len(v) - 1 for v in spec_data.AXES.values())  # the center is shared by every axis
    assert points == 16
    assert len(runs) == points * len(OPTIMIZERS) * len(spec_data.SEEDS)
    for run in runs:
        flat = flatten(run.config)
        off_center = [k for k in spec_data.CENTER if flat[k] != spec_data.CENTER[k]]
        assert len(off_center) <= 1
        assert run.config.optim == override(Config(), {"optim.name": run.config.optim.name}).resolved().optim


def test_flags_replace_axes_exactly():
    """The issue's example: 2 optimizers x 2 learning rates x 2 seeds = 8 runs."""
    names = list(OPTIMIZERS)[:2]
    argv = ["--p", "23", "--epochs", "60", "--train-fraction", "0.5", "--optimizers", ",".join(names),
            "--lr", "1e-3,3e-3", "--weight-decay", "1.0", "--seeds", "0,1", "--workers", "2"]
    spec, args, _ = parse_sweep_args("optimizers", argv)
    runs = expand(spec)
    assert len(runs) == len(names) * 2 * 2 and args.workers == 2
    assert {r.config.optim.lr for r in runs} == {1e-3, 3e-3}
    assert {(r.config.data.p, r.config.train.epochs, r.config.data.train_fraction) for r in runs} == {(23, 60, 0.5)}
    assert {r.config.optim.weight_decay for r in runs} == {1.0} and {r.config.seed for r in runs} == {0, 1}


def test_single_value_sets_the_base_and_several_add_a_crossed_axis():
    spec = default_spec("optimizers")
    one = apply_axes(spec, {"data.p": [23], "optim.lr": [1e-3], "optim.weight_decay": [1.0], "optim.beta1": [0.9],
                            "optim.beta2": [0.98], "optim.name": ["adamw"], "seed": [0]})
    assert one.base["data.p"] == 23 and len(expand(one)) == 1
    two = apply_axes(one, {"data.p": [23, 29], "model.mlp_ratio": [2, 4]})
    runs = expand(two)
    assert len(runs) == 4 and {(r.config.data.p, r.config.model.mlp_ratio) for r in runs} == \
        {(23, 2), (23, 4), (29, 2), (29, 4)}


def test_architecture_flag_replaces_a_knob_axis_and_keeps_the_center_on_it():
    spec = apply_axes(default_spec("architecture"), {"model.dim": [32, 64], "optim.name": ["adamw"], "seed": [0]})
    assert spec.center["model.dim"] == 32  # 128 is no longer on the axis
    runs = expand(spec)
    assert len(runs) == 2 + 3 + 3 + 3 + 3
    assert {r.config.model.dim for r in runs} == {32, 64}
    collapsed = apply_axes(spec, {"model.depth": [2], "model.heads": [1], "model.dropout": [0.2],
                                  "train.batch_size": [512]})
    assert len(expand(collapsed)) == 2


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written

@pytest.mark.parametrize("argv, message", [
    (["--model.dimm=32"], "unknown config key 'model.dimm'"),
    (["--optimizers", "adamw,nope"], "unknown optimizer 'nope'"),
    (["--lr", "1e-3,,x"], "malformed list --lr"),
    (["--lr", "1e-3,x"], "optim.lr='x' must be of type float"),
    (["--lr", ""], "malformed list --lr"),
    (["--dim", "0"], "model.dim=0 must be a positive integer"),
    (["--workers", "0"], "--workers=0 must be >= 1"),
    (["--workers", "two"], "invalid int value"),
    (["--seeds", "0,a"], "seed 'a' must be an integer"),
    (["--optimizers", "quad", "--beta2", "0.9,0.95"], "optim.beta2 is not a knob of quad (quad: lr,"),
    (["--optimizers", "quad", "--optim.preconditioner=dense,full"], "optim.preconditioner='full' must be one of"),
    (["--lrr", "1e-3"], "unrecognized argument"),
    (["--executor", "dask"], "invalid choice: 'dask'"),
    (["--ray-retries", "1"], "--ray-retries needs --executor ray"),
    (["--ray-address", "auto", "--ray-cpus-per-run", "2"], "--ray-address, --ray-cpus-per-run need --executor ray"),
    (["--executor", "ray", "--workers", "2"], "--workers is for the local executor"),
])
def test_bad_input_is_one_line_with_status_2_and_writes_nothing(tmp_path, capsys, argv, message):
    if "quad" in argv and "quad" not in OPTIMIZERS:
        pytest.skip("quad is not registered")
    out = tmp_path / "sweep"
    assert main_cli(["optimizers", *TINY, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_ray_executor_without_ray_is_a_one_line_error_saying_how_to_install_it(tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives: ImportError
    out = tmp_path / "sweep"
    assert main_cli(["optimizers", *TINY, "--executor", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "error: --executor ray needs Ray, which is not installed: pip install -r requirements-ray.txt\n"
    assert not out.exists()


def test_nothing_but_the_ray_executor_imports_ray():
    code = ("import sys, sweeps.__main__, sweeps.runner, sweeps.ray_executor, main; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_empty_grid_is_rejected():
    spec = default_spec("optimizers")
    with pytest.raises(ValueError, match="empty list"):
        apply_axes(spec, {"optim.lr": []})
    with pytest.raises(ValueError, match="optim.lr: axis must be a non-empty list"):
        expand(Spec("optimizers", {}, ["adamw"], {"adamw": {"optim.lr": []}}, [0]))
    with pytest.raises(ValueError, match="no seeds"):
        expand(Spec("optimizers", {}, ["adamw"], {}, []))


def test_cli_error_through_a_subprocess(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "sweeps", "architecture", "--heads", "1,3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "must be divisible by model.heads=3" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Naming

def test_run_names_are_readable_stable_and_distinct():
    runs = expand(default_spec("optimizers"))
    again = expand(default_spec("optimizers"))
    assert [r.name for r in runs] == [r.name for r in again]
    assert len({r.name for r in runs}) == len({r.hash for r in runs}) == len(runs)
    names = {r.name for r in runs}
    digest = spec_module.config_hash(override(Config(), {
        **default_spec("optimizers").base, "optim.lr": 3e-3, "optim.weight_decay": 0.3, "seed": 0}))
    assert f"adamw_lr0.003_wd0.3_s0-{digest}" in names
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9.+_-]+-[0-9a-f]{8}", name)
    arch = expand(default_spec("architecture"))
    assert len({r.name for r in arch}) == len(arch)


def test_hash_covers_the_full_resolved_config():
    base = override(Config(), {"data.p": 7})
    assert spec_module.config_hash(base) == spec_module.config_hash(base.resolved())  # defaults filled in: same run
    assert spec_module.config_hash(base) != spec_module.config_hash(override(base, {"data.p": 11}))
    assert spec_module.config_hash(base) != spec_module.config_hash(override(base, {"model.mlp_ratio": 2}))


# ---------------------------------------------------------------------------------------------
# End to end: runs, skipping, killed runs, table, figures

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2 optimizer x 2 lr x 1 seed sweep run through ``python -m sweeps`` with 2 workers, each optimizer's
    best confirmed on seed 7."""
    out = tmp_path_factory.mktemp("sweep")
    names = list(OPTIMIZERS)[:2]
    argv = [sys.executable, "-m", "sweeps", "optimizers", *TINY, "--optimizers", ",".join(names),
            "--lr", "1e-3,3e-3", "--weight-decay", "0.1", "--seeds", "0", "--confirm-seeds", "7", "--workers", "2",
            "--out", str(out), "--media", str(out / "figures")]
    first = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    return out, argv, first.stdout, 2 * len(names)


def test_sweep_writes_runs_table_points_and_figures(swept):
    out, _, stdout, n = swept
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == n and all((d / "summary.json").exists() for d in runs)
    assert {"config.json", "metrics.jsonl", "summary.json", "log.txt"} <= {p.name for p in runs[0].iterdir()}
    rows = results.read_table(out / "results.csv")
    assert len(rows) == n and len({r["hash"] for r in rows}) == n
    assert all(r["epochs_run"] == 3 and r["steps_to_target"] is None or r["reached"] for r in rows)
    points = results.read_table(out / "points.csv")
    assert len(points) == n and all(p["runs"] == 1 for p in points)
    assert sum(p["best"] for p in points) == n // 2
    confirmed = results.read_table(out / "confirm" / "results.csv")
    assert len(confirmed) == n // 2 and {r["seed"] for r in confirmed} == {7}
    assert {r["optimizer"] for r in results.read_table(out / "verdict.csv")} == {r["optim.name"] for r in rows}
    assert "Verdict: time to 90% validation accuracy" in stdout and (out / "verdict.md").exists()
    figures = {p.name for p in (out / "figures").iterdir()}
    names = {r["optim.name"] for r in rows}
    assert {f"best_{name}.png" for name in names} | {f"heatmap_{name}.png" for name in names} <= figures
    assert {"best_all.png", "survival.png", "sensitivity.png"} <= figures
    assert all((out / "figures" / f).stat().st_size > 10_000 for f in figures)
    assert json.loads((out / "sweep.json").read_text())["kind"] == "optimizers"
    assert f"{n} new" in stdout


def test_second_invocation_skips_every_finished_run(swept):
    out, argv, _, n = swept
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    second = subprocess.run(argv + ["--no-plot"], cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert f"{n} done (skipped), 0 unfinished (resume from a checkpoint), 0 unfinished (redo), 0 new" in second.stdout
    assert "running 0" in second.stdout
    assert before == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_killed_run_is_redone_and_counted_once(swept, capsys):
    out, argv, _, n = swept
    victim = sorted((out / "runs").iterdir())[0]
    (victim / "summary.json").unlink()  # killed mid-way: config.json and a partial metrics file only
    shutil.rmtree(victim / "checkpoints")  # before its first checkpoint
    (victim / "metrics.jsonl").rename(victim / "metrics.jsonl.partial")
    assert len(results.rebuild_table(out)) == n - 1  # never counted while unfinished
    cli = argv[argv.index("optimizers"):]
    assert main_cli(cli + ["--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert f"redo   {victim.name}" in listing
    assert f"{n - 1} done (skipped), 0 unfinished (resume from a checkpoint), 1 unfinished (redo)" in listing
    assert main_cli(cli + ["--no-plot"]) == 0
    assert (victim / "summary.json").exists() and (victim / "metrics.jsonl").exists()
    rows = results.read_table(out / "results.csv")
    assert len(rows) == n and len({r["run"] for r in rows}) == n


def test_table_is_rebuilt_from_run_dirs_without_duplicates(swept, capsys):
    out, _, _, n = swept
    with open(out / "results.csv", newline="") as f:
        before = list(csv.DictReader(f))
    (out / "results.csv").unlink()
    first = sorted((out / "runs").iterdir())[0]
    shutil.copytree(first, out / "runs" / ("renamed_" + first.name))  # same config (hash) under another name
    assert main_cli(["table", str(out)]) == 0
    assert "finished runs" in capsys.readouterr().out
    with open(out / "results.csv", newline="") as f:
        after = list(csv.DictReader(f))
    shutil.rmtree(out / "runs" / ("renamed_" + first.name))
    assert len(after) == n and {r["hash"] for r in after} == {r["hash"] for r in before}
    assert main_cli(["table", str(out / "nope")]) == 2


def test_architecture_from_results_takes_each_optimizers_best(swept):
    out, _, _, _ = swept
    best = results.best_points(summarize(results.read_table(out / "results.csv")))
    spec, _, _ = parse_sweep_args("architecture", ["--from-results", str(out), "--seeds", "0"])
    assert set(spec.optimizers) == set(best)
    for run in expand(spec):
        assert run.config.optim.lr == best[run.config.optim.name]["optim.lr"]


def test_workers_split_the_blas_threads():
    assert executors.LocalPool(2).describe().endswith(f"{max(1, executors.cpu_count() // 2)} BLAS thread(s) each")
    assert executors.worker_env(3)["OPENBLAS_NUM_THREADS"] == "3"
    assert executors.worker_env(0)["OMP_NUM_THREADS"] == "1"


# ---------------------------------------------------------------------------------------------
# Statistics and figures on synthetic rows

def synthetic(name, seed, epochs, lr=1e-3, wd=0.1, dim=16, budget=400):
    solved = epochs is not None
    flat = flatten(override(Config(), {"optim.lr": lr, "optim.weight_decay": wd, "model.dim": dim,
                                                      "train.epochs": budget, "seed": seed}).resolved())
    flat["optim.name"] = name  # any name: the statistics and figures never consult the registry
    observed = epochs or budget
    return {"run": f"{name}_lr{lr:g}_wd{wd:g}_dim{dim}_s{seed}-{seed:08x}", "hash": f"{seed:08x}",
            "target": 0.9, "reached": solved, "epochs_to_target": epochs,
            "steps_to_target": None if epochs is None else 10 * epochs,
            "seconds_to_target": None if epochs is None else epochs / 2, "epochs_observed": observed,
            "steps_observed": 10 * observed, "seconds_observed": observed / 2, "budget_epochs": budget,
            "budget_steps": 10 * budget, **flat, "best_val_acc": 0.95 if solved else 0.5,
            "epochs_run": observed, "steps_run": 10 * observed}


def test_censoring_statistics():
    rows = [synthetic("adamw", 0, 100), synthetic("adamw", 1, 300), synthetic("adamw", 2, None)]
    (point,) = summarize(rows)
    assert (point["runs"], point["reached"], point["censored"], point["reached_frac"]) == (3, 2, 1, 2 / 3)
    # Kaplan-Meier over all three seeds (the third censored at the budget, 400): F = 1/3 at 100, 2/3 at 300,
    # so the median is 300; the median of the two that reached (200) is never reported.
    assert point["epochs_km_median"] == 300 and point["steps_km_median"] == 3000
    assert point["epochs_km"].startswith("300 [100, ")
    (point,) = summarize([synthetic("adamw", 0, 100), synthetic("adamw", 1, None), synthetic("adamw", 2, None)])
    assert point["epochs_km_median"] is None and point["epochs_km"].startswith("> 400 [")
    (point,) = summarize([synthetic("adamw", s, None) for s in range(2)])
    assert point["reached"] == 0 and point["epochs_km"] == "> 400 [> 400, > 400]"
    fast_but_flaky = [synthetic("adamw", s, t, lr=3e-3) for s, t in enumerate((50, None, None))]
    slow_but_sure = [synthetic("adamw", s, t) for s, t in enumerate((200, 250, 300))]
    best = results.best_points(summarize(fast_but_flaky + slow_but_sure))["adamw"]
    assert best["optim.lr"] == 1e-3


def test_figures_from_synthetic_rows_mark_censored_runs(tmp_path):
    from sweeps import plot as sweep_plot
    import matplotlib.pyplot as plt
    rows = [synthetic(name, s, None if (dim == 64 and name == "adamw") else dim + 10 * s, dim=dim)
            for name in ("adamw", "third") for dim in (16, 32, 64) for s in range(3)]
    fig, ax = plt.subplots()
    sweep_plot.plot_sweep(ax, rows, x="model.dim", y="epochs_to_target", hue="optim.name")
    censored = [c for c in ax.collections if c.get_offsets().shape[0] == 3 and
                np.allclose(c.get_offsets()[:, 1], 400)]
    assert len(censored) == 1  # three unsolved adamw seeds at dim 64, at the budget
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"adamw", "third", "not reached (at budget)"}
    assert sweep_plot.save(fig, tmp_path / "sweep.png").stat().st_size > 5_000
    # one seed that reached the target leaves the median's upper end open: the band runs up to the budget,
    # in steps as in epochs, not to the step the run stopped at
    for y, budget in (("epochs_to_target", 400), ("steps_to_target", 4000)):
        fig, ax = plt.subplots()
        sweep_plot.plot_sweep(ax, [synthetic("adamw", 0, 100, dim=d) for d in (16, 32)], x="model.dim", y=y)
        (band,) = [c for c in ax.collections if c.get_paths()]
        assert band.get_paths()[0].vertices[:, 1].max() == budget
        plt.close(fig)
    grid = [synthetic("adamw", s, None if lr == 1e-3 else 100 + s, lr=lr, wd=wd)
            for lr in (1e-3, 3e-3) for wd in (0.0, 0.3) for s in range(2)]
    fig, ax = plt.subplots()
    sweep_plot.plot_heatmap(ax, grid)
    assert {t.get_text() for t in ax.texts} == {">400", "100"}  # median of 100, 101 rounds to 100
    assert sum(p.get_hatch() == "///" for p in ax.patches) == 2
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Fairness

def test_same_seed_gives_every_optimizer_the_same_initial_weights_and_split(monkeypatch):
    """Record what ``train`` really builds: the model's initial parameters and the data split."""
    inits, splits = [], []

    class Recording(models.Transformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inits.append({k: np.array(v) for k, v in tree_flatten(self.parameters())})

    def recording_split(cfg, rng):
        out = original_split(cfg, rng)
        splits.append([np.array(a) for a in out])
        return out

    original_split = data.split
    monkeypatch.setattr(models, "Transformer", Recording)
    monkeypatch.setattr(data, "split", recording_split)
    tiny = {"data.p": 7, "data.op": "+", "model.dim": 16, "model.depth": 1, "train.batch_size": 32, "train.epochs": 1}
    optims = [{"optim.name": name} for name in OPTIMIZERS] + [{"optim.name": "adamw", "optim.lr": 0.1,
                                                               "optim.beta1": 0.5}]
    for seed in (0, 1):
        for o in optims if seed == 0 else optims[:1]:
            train(override(Config(), {**tiny, **o, "seed": seed}), None, progress=False)
    same = len(optims)
    for init, split in zip(inits[1:same], splits[1:same]):
        assert init.keys() == inits[0].keys()
        assert all(np.array_equal(init[k], inits[0][k]) for k in init)
        assert all(np.array_equal(a, b) for a, b in zip(split, splits[0]))
    other = inits[-1]  # seed 1
    assert not all(np.array_equal(other[k], inits[0][k]) for k in other)
    assert not all(np.array_equal(a, b) for a, b in zip(splits[-1], splits[0]))


def test_a_killed_sweep_run_resumes_from_its_checkpoint_without_recomputing_earlier_epochs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["optimizers", "--p", "11", "--op", "+", "--dim", "16", "--depth", "1", "--batch-size", "16",
            "--epochs", "8", "--optimizers", "adamw", "--lr", "1e-3", "--weight-decay", "0.1", "--seeds", "0",
            "--checkpoint-every", "2", "--no-plot", "--out", str(out)]
    assert main_cli(argv) == 0
    (run_dir,) = (out / "runs").iterdir()
    reference = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(run_dir)]
    config = json.loads((run_dir / "config.json").read_text())
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "killed_run.py"),
                             json.dumps({k: v for k, v in flatten_dict(config).items()}), str(run_dir), "steps:6",
                             "2"], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl.partial").read_text().splitlines()]
    assert len(before) == 5  # epochs 1-5 evaluated; the last checkpoint is at epoch 4
    capsys.readouterr()
    assert main_cli(argv) == 0
    assert "1 unfinished (resume from a checkpoint)" in capsys.readouterr().out
    after = read_metrics(run_dir)
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in after] == reference
    assert [r["elapsed_s"] for r in after[:4]] == [r["elapsed_s"] for r in before[:4]]  # not recomputed
    assert after[4]["elapsed_s"] != before[4]["elapsed_s"]  # epoch 5: after the checkpoint, trained again
