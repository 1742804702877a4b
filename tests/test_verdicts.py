"""Verdicts: censored statistics in points.csv, search edges and their extension, confirmation seeds, the
paired comparison and the headline, on synthetic run directories written by a fake executor (no training)."""
import dataclasses
import json
import math
import types

import numpy as np
import pytest

from config import Config, override
from sweeps import results, stats, verdict
from sweeps.__main__ import main_cli
from sweeps.runner import run_sweep
from sweeps.spec import Spec
from training import loop as training_loop
from training.rundir import write_json_atomic

BASE = {"data.p": 7, "data.op": "+", "model.dim": 16, "model.depth": 1, "train.batch_size": 32,
        "train.epochs": 40, "train.early_stop_val_acc": 0.9}
STEPS_PER_EPOCH = 10
SECONDS_PER_EPOCH = 0.5


def bowl(lr_best=3e-3, wd_best=0.3):
    """Epochs to 90% for a config: a bowl in log lr and log wd around ``(lr_best, wd_best)`` (None past the
    budget of 40), plus the seed mod 3."""
    def epochs(cfg):
        o = cfg.optim
        e = 10 + 12 * abs(math.log10(o.lr / lr_best)) + 8 * abs(math.log10(o.weight_decay / wd_best)) + cfg.seed % 3
        return round(e) if e <= cfg.train.epochs else None
    return epochs


class FakeExecutor:
    """Writes each run's directory at once: config.json, metrics.jsonl (validation accuracy 0.1 until the
    epoch ``epochs(cfg)`` returns, then 1.0; stopped there by the early stop) and summary.json (with
    ``training.loop.summarize``, as a real run writes it)."""

    def __init__(self, epochs):
        self.epochs, self.ran = epochs, []

    def describe(self):
        return "a fake executor"

    def execute(self, todo, on_done):
        for run, d in todo:
            write_run(d, run.config, self.epochs(run.config))
            self.ran.append(run)
            on_done(run, d, 0.0, True)
        return []


def write_run(d, cfg, reach, dip=False):
    """A finished run directory of ``cfg`` reaching 90% (and 100%) at epoch ``reach`` (None: never)."""
    cfg = cfg.resolved()
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(d / "config.json", dataclasses.asdict(cfg))
    last = reach if reach is not None and cfg.train.early_stop_val_acc else cfg.train.epochs
    metrics = []
    for e in range(1, last + 1):
        acc = 1.0 if reach is not None and e >= reach else 0.1
        if dip and e == reach + 1:
            acc = 0.5
        metrics.append(dict(epoch=e, step=STEPS_PER_EPOCH * e, train_loss=1.0, train_acc=1.0, val_loss=1.0,
                            val_acc=acc, elapsed_s=round(SECONDS_PER_EPOCH * e, 4)))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    budget = cfg.train.epochs * STEPS_PER_EPOCH
    fake = types.SimpleNamespace(metrics=metrics, cfg=cfg, step=metrics[-1]["step"], budget=budget, diverged=False,
                                 elapsed_before=metrics[-1]["elapsed_s"], started=float("inf"), train_s=1.0,
                                 eval_s=1.0)
    summary = training_loop.summarize(fake)
    summary["wall_s"] = metrics[-1]["elapsed_s"]
    write_json_atomic(d / "summary.json", summary)
    return summary


def spec(lr, wd, seeds=(0,), optimizers=("adamw",), base=BASE):
    search = {name: {"optim.lr": list(lr), "optim.weight_decay": list(wd)} for name in optimizers}
    return Spec("optimizers", dict(base), list(optimizers), search, list(seeds))


def optima_of(tmp_path, s, surface):
    run_sweep(s, tmp_path, FakeExecutor(surface))
    return verdict.find_optima(s, results.collect(tmp_path))


# ---------------------------------------------------------------------------------------------
# Seconds and sustained times, from the summary

def test_summary_records_seconds_to_each_threshold_and_sustained(tmp_path):
    cfg = override(Config(), {**BASE, "train.early_stop_val_acc": None, "seed": 0})
    summary = write_run(tmp_path / "run-0000abcd", cfg, 12, dip=True)  # 1.0 at 12, 0.5 at 13, 1.0 from 14
    assert (summary["epochs_to_90"], summary["steps_to_90"], summary["seconds_to_90"]) == (12, 120, 6.0)
    assert summary["seconds_to_95"] == summary["seconds_to_99"] == 6.0
    assert (summary["epochs_sustained_95"], summary["steps_sustained_95"], summary["seconds_sustained_95"]) == \
        (14, 140, 7.0)
    row = results.run_row(tmp_path / "run-0000abcd", results.SUSTAINED)
    assert (row["epochs_to_target"], row["steps_to_target"], row["seconds_to_target"]) == (14, 140, 7.0)
    # From the summary, not the metrics: a summary that says otherwise wins.
    summary["epochs_sustained_95"] = 20
    write_json_atomic(tmp_path / "run-0000abcd" / "summary.json", summary)
    assert results.run_row(tmp_path / "run-0000abcd", results.SUSTAINED)["epochs_to_target"] == 20
    assert results.run_row(tmp_path / "run-0000abcd", 0.9)["epochs_to_target"] == 12
    with pytest.raises(ValueError, match="must be one of 0.9, 0.95, 0.99, sustained95"):
        results.parse_target("0.8")
    assert results.parse_target("0.95") == 0.95 and results.parse_target("sustained95") == results.SUSTAINED


# ---------------------------------------------------------------------------------------------
# Kaplan-Meier in points.csv

def test_points_csv_kaplan_meier_against_a_hand_worked_case(tmp_path):
    reach = {0: 10, 1: 20, 2: 30, 3: None, 4: None}  # epochs to 90%, budget 40
    s = spec([1e-3], [0.1], seeds=range(5))
    run_sweep(s, tmp_path, FakeExecutor(lambda cfg: reach[cfg.seed]))
    (point,) = results.read_table(tmp_path / "points.csv")
    assert (point["runs"], point["reached"], point["censored"], point["reached_frac"]) == (5, 3, 2, 0.6)
    # n at risk 5, 4, 3 at t = 10, 20, 30: F = 1/5, 2/5, 3/5 (the two censored at 40 stay at risk): the
    # median is 30, not 20 (the median of the three that reached). Its interval: F's upper limit passes 1/2
    # at t = 10 (S = 0.8, se = sqrt(1/20) / |ln 0.8| = 1.002, 1 - 0.8^exp(1.96 se) = 0.796); F's lower limit
    # is 1 - 0.4^exp(-1.96 * sqrt(0.3) / |ln 0.4|) = 0.247 < 1/2 at t = 30, and nothing happens after:
    # the upper end is not identified within the budget.
    assert (point["epochs_km_median"], point["epochs_km_lower"], point["epochs_km_upper"]) == (30, 10, None)
    assert point["epochs_km"] == "30 [10, > 40]"
    assert point["steps_km"] == "300 [100, > 400]"
    assert point["seconds_km"] == "15 [5, > 20]"
    assert not any(k.endswith("_median_all") or k == "solved" for k in point)
    rows = results.read_table(tmp_path / "results.csv")
    censored = [r for r in rows if not r["reached"]]
    assert {(r["epochs_observed"], r["steps_observed"], r["seconds_observed"]) for r in censored} == {(40, 400, 20)}


def test_rank_by_censored_median_then_fraction_reached(tmp_path):
    fast_but_flaky = {0: 5, 1: None, 2: None}  # fastest run, but the median is not identified: ranked last
    same_median_fewer = {0: 20, 1: 25, 2: None}  # median 25 (F = 2/3 at 25)
    same_median_all = {0: 20, 1: 25, 2: 30}  # median 25, and every seed reached: best
    s = spec([1e-3, 3e-3, 1e-2], [0.1], seeds=range(3))
    surfaces = {1e-3: fast_but_flaky, 3e-3: same_median_fewer, 1e-2: same_median_all}
    run_sweep(s, tmp_path, FakeExecutor(lambda cfg: surfaces[cfg.optim.lr][cfg.seed]))
    points = results.summarize(results.collect(tmp_path))
    assert [p["optim.lr"] for p in points] == [1e-2, 3e-3, 1e-3]
    assert [p["steps_km_median"] for p in points] == [250, 250, None]
    assert results.best_points(points)["adamw"]["optim.lr"] == 1e-2


# ---------------------------------------------------------------------------------------------
# Search edges

def test_edges_corner_one_edge_interior_and_bound(tmp_path):
    lr, wd = [1e-3, 3e-3, 1e-2], [0.03, 0.1, 0.3]
    corner = optima_of(tmp_path / "corner", spec(lr, wd), bowl(1e-1, 1e-3))["adamw"]
    assert (corner.point["optim.lr"], corner.point["optim.weight_decay"]) == (1e-2, 0.03)
    assert set(corner.extensions) == {"optim.lr", "optim.weight_decay"} and not corner.interior
    assert corner.extendable() == {"optim.lr": [3e-2], "optim.weight_decay": [1e-2]}

    edge = optima_of(tmp_path / "edge", spec(lr, wd), bowl(1e-1, 0.1))["adamw"]
    assert edge.extendable() == {"optim.lr": [3e-2]} and edge.edges["optim.weight_decay"].position == "interior"
    assert "lr on its high edge (0.01): next 0.03" in edge.describe()

    inside = optima_of(tmp_path / "inside", spec(lr, wd), bowl(3e-3, 0.1))["adamw"]
    assert inside.interior and inside.describe() == "interior" and inside.extendable() == {}

    # AdamW's lr may be extended up to 1.0 (its limits): a best at 1.0 is blocked there.
    bound = optima_of(tmp_path / "bound", spec([0.1, 0.3, 1.0], wd), bowl(5.0, 0.1))["adamw"]
    assert bound.point["optim.lr"] == 1.0 and bound.extendable() == {}
    assert bound.blocked() and bound.blocked()[0][:2] == ("optim.lr", "high")
    assert "can't extend" in bound.describe() and not bound.interior


def test_points_csv_marks_the_best_point_and_its_edge(tmp_path):
    s = spec([1e-3, 3e-3, 1e-2], [0.1, 0.3], seeds=[0])
    run_sweep(s, tmp_path, FakeExecutor(bowl(1e-1, 0.1)))
    verdict.rebuild(tmp_path)
    points = results.read_table(tmp_path / "points.csv")
    best = [p for p in points if p["best"]]
    assert len(best) == 1 and best[0]["optim.lr"] == 1e-2 and "lr on its high edge" in best[0]["search_edge"]
    assert all(p["search_edge"] is None for p in points if not p["best"])


# ---------------------------------------------------------------------------------------------
# --extend

def test_extend_adds_exactly_the_next_values_and_stops_when_interior(tmp_path, capsys):
    s = spec([1e-3, 3e-3, 1e-2], [0.1, 0.3, 1.0], seeds=[0, 1])
    fake = FakeExecutor(bowl(5e-2, 0.3))
    assert verdict.run_optimizer_sweep(s, tmp_path, fake, extend=True, confirm=[]) == 0
    out = capsys.readouterr().out
    tuned = [r for r in fake.ran if r.config.seed in (0, 1)]
    # Round 1 adds 3e-2 (the half-decade grid's next value); its best is then 3e-2, on the edge again;
    # round 2 adds 1e-1, and 3e-2 is interior (|log(0.03/0.05)| < |log(0.1/0.05)|): no round 3.
    assert sorted({r.config.optim.lr for r in tuned}) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert {r.config.optim.weight_decay for r in tuned} == {0.1, 0.3, 1.0}
    assert len(tuned) == len({r.hash for r in tuned}) == 5 * 3 * 2  # every run once, the grid kept whole
    assert "extension round 1: adamw lr + 0.03" in out and "extension round 2: adamw lr + 0.1" in out
    assert "extension round 3" not in out and "adamw best point: interior" in out
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["spec"]["search"]["adamw"]["optim.lr"] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert meta["extended"] == {"adamw": {"optim.lr": [3e-2, 1e-1]}}
    (row,) = results.read_table(tmp_path / "verdict.csv")
    assert row["interior"] and "(+0.03, 0.1 by extension)" in row["search"]


def test_extend_stops_at_a_bound_and_after_the_round_cap(tmp_path, capsys):
    s = spec([0.1, 0.3], [0.3], seeds=[0])
    fake = FakeExecutor(bowl(5.0, 0.3))
    assert verdict.run_optimizer_sweep(s, tmp_path / "bound", fake, extend=True, confirm=[]) == 0
    out = capsys.readouterr().out
    assert sorted({r.config.optim.lr for r in fake.ran}) == [0.1, 0.3, 0.9, 1.0]  # x3, then clipped to 1.0
    assert "stopped by a bound: adamw lr (high)" in out and "extension round 3" not in out

    faster_with_lr = lambda cfg: round(30 - 4 * math.log10(cfg.optim.lr / 1e-4))  # noqa: E731
    fake = FakeExecutor(faster_with_lr)
    s = spec([1e-4, 3e-4], [0.3], seeds=[0])
    assert verdict.run_optimizer_sweep(s, tmp_path / "cap", fake, extend=True, rounds=1, confirm=[]) == 0
    out = capsys.readouterr().out
    assert sorted({r.config.optim.lr for r in fake.ran}) == pytest.approx([1e-4, 3e-4, 9e-4])
    assert "extension stopped after 1 round(s) (--extend-rounds): adamw still on an edge" in out

    fake = FakeExecutor(faster_with_lr)
    assert verdict.run_optimizer_sweep(s, tmp_path / "off", fake, confirm=[]) == 0
    assert "--extend adds the next values" in capsys.readouterr().out and len(fake.ran) == 2


# ---------------------------------------------------------------------------------------------
# Confirmation and the headline

def two_optimizers(tmp_path, confirm=(10, 11, 12, 13, 14)):
    """adamw and quad, two lrs each, tuning seeds 0-2; per seed the epochs are set by hand so that on the
    confirmation seeds adamw reaches first on 10, 11, 12, quad on 13 and neither on 14."""
    confirm_times = {"adamw": {10: 12, 11: 14, 12: 16, 13: 30, 14: None},
                     "quad": {10: 20, 11: 21, 12: 22, 13: 18, 14: None}}

    def epochs(cfg):
        if cfg.seed in confirm_times["adamw"]:
            return confirm_times[cfg.optim.name][cfg.seed]
        return (5 if cfg.optim.lr == 3e-3 else 25) + cfg.seed  # tuning: fast at lr 3e-3 on seeds 0-2

    s = spec([1e-3, 3e-3, 1e-2], [0.1, 0.3, 1.0], seeds=[0, 1, 2], optimizers=("adamw", "quad"))
    fake = FakeExecutor(epochs)
    assert verdict.run_optimizer_sweep(s, tmp_path, fake, confirm=list(confirm)) == 0
    return fake, confirm_times


def test_confirmation_reruns_each_best_on_disjoint_seeds_and_the_headline_uses_only_them(tmp_path, capsys):
    fake, times = two_optimizers(tmp_path)
    out = capsys.readouterr().out
    confirm_runs = [r for r in fake.ran if r.config.seed >= 10]
    assert len(confirm_runs) == 2 * 5 and {r.config.optim.lr for r in confirm_runs} == {3e-3}
    assert {r.config.optim.weight_decay for r in confirm_runs} == {0.1}  # ties broken the same way for both
    tuned = {(r.config.optim.name, dataclasses.replace(r.config, seed=0)) for r in fake.ran if r.config.seed < 10}
    assert all((r.config.optim.name, dataclasses.replace(r.config, seed=0)) in tuned for r in confirm_runs)
    assert (tmp_path / "confirm" / "runs").is_dir() and len(list((tmp_path / "confirm" / "runs").iterdir())) == 10

    v = verdict.compute(tmp_path)
    rows = {r["optimizer"]: r for r in results.read_table(tmp_path / "verdict.csv")}
    for name in ("adamw", "quad"):
        assert {r["seed"] for r in v.headline[name]} == {10, 11, 12, 13, 14}
        assert rows[name]["confirmed"] and rows[name]["seeds"] == "10 11 12 13 14"
        assert (rows[name]["runs"], rows[name]["reached"]) == (5, 4)
        assert (rows[name]["tuning_runs"], rows[name]["tuning_reached"]) == (3, 3)
        km = stats.median_time(stats.kaplan_meier([t or 40 for t in times[name].values()],
                                                  [t is not None for t in times[name].values()]), budget=40)
        assert rows[name]["epochs_km"] == stats.format_median(km)
    assert rows["adamw"]["epochs_km_median"] == 16 and rows["quad"]["epochs_km_median"] == 21
    assert rows["adamw"]["points_searched"] == 9 and rows["adamw"]["points_reaching"] == 9
    md = (tmp_path / "verdict.md").read_text()
    assert "confirmation seeds [10, 11, 12, 13, 14] only (selected on tuning seeds [0, 1, 2])" in md
    assert "Verdict: time to 90% validation accuracy" in out


def test_paired_comparison_in_the_verdict(tmp_path, capsys):
    _, times = two_optimizers(tmp_path)
    pairs = results.read_table(tmp_path / "verdict_pairs.csv")
    steps = next(p for p in pairs if p["unit"] == "steps")
    assert (steps["a"], steps["b"], steps["seeds"]) == ("adamw", "quad", 5)
    assert (steps["a_first"], steps["b_first"], steps["ties"]) == (3, 1, 1)
    assert steps["fraction"] == pytest.approx((3 + 0.5) / 5)
    expected = stats.paired_comparison({s: t and 10 * t for s, t in times["adamw"].items()},
                                       {s: t and 10 * t for s, t in times["quad"].items()})
    assert (steps["lower"], steps["upper"]) == pytest.approx((expected.lower, expected.upper))
    rows = {r["optimizer"]: r for r in results.read_table(tmp_path / "verdict.csv")}
    assert rows["adamw"]["first_vs_quad"] == f"0.70 [{expected.lower:.2f}, {expected.upper:.2f}]"
    assert rows["quad"]["first_vs_adamw"] == f"0.30 [{1 - expected.upper:.2f}, {1 - expected.lower:.2f}]"
    assert "| adamw vs quad | steps | 5 | 3 | 1 | 1 | 0.70" in (tmp_path / "verdict.md").read_text()


def test_confirmation_seeds_must_be_disjoint_from_the_tuning_seeds(tmp_path, capsys):
    assert verdict.parse_confirm_seeds(None) == [1000, 1001, 1002, 1003, 1004]
    assert verdict.parse_confirm_seeds("none") == [] and verdict.parse_confirm_seeds("7,8") == [7, 8]
    with pytest.raises(ValueError, match="overlap the tuning seeds"):
        verdict.run_optimizer_sweep(spec([1e-3], [0.1], seeds=[0, 1]), tmp_path, FakeExecutor(bowl()),
                                    confirm=[1, 2])
    out = tmp_path / "sweep"
    argv = ["optimizers", "--p", "7", "--optimizers", "adamw", "--seeds", "0,1", "--confirm-seeds", "1,2",
            "--out", str(out)]
    assert main_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --confirm-seeds [1, 2] overlap the tuning seeds [0, 1] at [1]") and \
        err.count("\n") == 1
    assert not out.exists()


def test_not_confirmed_is_said_and_the_table_command_changes_target_without_rerunning(tmp_path, capsys):
    s = spec([1e-3, 3e-3], [0.1], seeds=[0, 1, 2])
    fake = FakeExecutor(bowl(3e-3, 0.1))
    assert verdict.run_optimizer_sweep(s, tmp_path, fake, confirm=[]) == 0
    (row,) = results.read_table(tmp_path / "verdict.csv")
    assert not row["confirmed"] and "NOT confirmed" in (tmp_path / "verdict.md").read_text()
    ran = len(fake.ran)
    capsys.readouterr()
    assert main_cli(["table", str(tmp_path), "--target", "sustained95"]) == 0
    assert "95% validation accuracy, sustained to the end" in capsys.readouterr().out
    assert {p["target"] for p in results.read_table(tmp_path / "points.csv")} == {"sustained95"}
    assert len(fake.ran) == ran


def test_figures_survival_sensitivity_and_heatmap_edge_markers(tmp_path):
    from sweeps import plot as sweep_plot
    two_optimizers(tmp_path)
    saved = {p.name for p in sweep_plot.save_figures(tmp_path, tmp_path / "media")}
    assert {"survival.png", "sensitivity.png", "best_all.png", "heatmap_adamw.png", "heatmap_quad.png"} <= saved
    import matplotlib.pyplot as plt
    rows = results.collect(tmp_path)
    fig, ax = plt.subplots()
    sweep_plot.plot_heatmap(ax, [r for r in rows if r["optim.name"] == "adamw"], best=(1.0, 1e-2),
                            edges=[("y", "high"), ("x", "high")])
    markers = [line.get_marker() for line in ax.lines]
    assert sorted(markers) == [">", "^"]
    assert any(isinstance(p, sweep_plot.Rectangle) and p.get_edgecolor()[:3] == (1.0, 0.0, 0.0) for p in ax.patches)
    plt.close(fig)
    v = verdict.compute(tmp_path)
    fig, axes = plt.subplots(1, 3)
    sweep_plot.plot_survival(axes, v.headline, sweep_plot.hue_colors(["adamw", "quad"]))
    censor_ticks = [line for line in axes[0].lines if line.get_marker() == "|"]
    assert [len(line.get_xdata()) for line in censor_ticks] == [1, 1]  # seed 14 of each, at the budget
    assert np.allclose([line.get_xdata()[0] for line in censor_ticks], 40)
    plt.close(fig)


def test_early_stop_below_the_target_is_censored_where_it_stopped_and_said(tmp_path):
    s = spec([1e-3, 3e-3], [0.1], seeds=[0, 1])
    assert verdict.run_optimizer_sweep(s, tmp_path, FakeExecutor(bowl(3e-3, 0.1)), confirm=[]) == 0
    v = verdict.rebuild(tmp_path, 0.99)  # the runs stopped at 90%: reached 99% there too (accuracy 1.0)
    assert all(r["reached"] for r in v.tuning) and not v.notes[1:]
    rows = []
    for d in sorted((tmp_path / "runs").iterdir()):  # now make every run stop at 0.9 with accuracy 0.92
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        metrics[-1]["val_acc"] = 0.92
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        summary = json.loads((d / "summary.json").read_text())
        for k in ("epochs_to_99", "steps_to_99", "seconds_to_99"):
            summary[k] = None
        write_json_atomic(d / "summary.json", summary)
        rows.append(results.run_row(d, 0.99))
    assert all(r["censored_early"] and r["epochs_observed"] == r["epochs_run"] < 40 for r in rows)
    v = verdict.rebuild(tmp_path, 0.99)
    assert any("stopped at their early stop, below this target" in n for n in v.notes)


def test_architecture_from_results_takes_the_confirmed_best_from_the_verdict(tmp_path):
    two_optimizers(tmp_path)
    assert results.best_from_results(tmp_path)["adamw"]["optim.lr"] == [3e-3]
    rows = results.read_table(tmp_path / "verdict.csv")
    for r in rows:  # a verdict whose confirmed adamw configuration differs from the tuning best
        r["optim.lr"] = 1e-2 if r["optimizer"] == "adamw" else r["optim.lr"]
        r["confirmed"] = r["optimizer"] == "adamw"
    results.write_csv(tmp_path / "verdict.csv", rows)
    best = results.best_from_results(tmp_path)
    assert best["adamw"]["optim.lr"] == [1e-2]  # confirmed: taken from the verdict
    assert best["quad"]["optim.lr"] == [3e-3]   # not confirmed: the tuning best
    from sweeps.__main__ import parse_sweep_args
    arch, _, _ = parse_sweep_args("architecture", ["--from-results", str(tmp_path), "--seeds", "0"])
    assert arch.search["adamw"]["optim.lr"] == [1e-2]
