"""sweeps.stats: hand-worked Kaplan-Meier, medians, paired wins, search edges, sensitivity, reach times."""
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sweeps import stats

ROOT = Path(__file__).resolve().parents[1]
Z = 1.959963984540054

# Nine runs (time, reached): 2 R, 3 R, 3 R, 3 C, 5 C, 6 R, 8 C, 9 R, 10 C.
TIMES = [2, 3, 3, 3, 5, 6, 8, 9, 10]
REACHED = [True, True, True, False, False, True, False, True, False]


def loglog_band(s, greenwood_sum):
    """F's band from S and Greenwood's sum: 1 - S^exp(-/+ z sqrt(sum) / |log S|)."""
    se = math.sqrt(greenwood_sum) / abs(math.log(s))
    return 1 - s ** math.exp(-Z * se), 1 - s ** math.exp(Z * se)


# ---------------------------------------------------------------------------------------------
# Kaplan-Meier

def test_kaplan_meier_hand_example_with_ties_and_censoring():
    km = stats.kaplan_meier(TIMES, REACHED)
    # t   n  d  c   S                              Greenwood sum d/(n(n-d))
    # 2   9  1  0   1 - 1/9 = 8/9                  1/(9*8) = 1/72
    # 3   8  2  1   8/9 * (1 - 2/8) = 2/3          1/72 + 2/(8*6) = 1/72 + 3/72 = 1/18
    #     (the censored run at 3 is still at risk at 3: events before censorings)
    # 5   5  0  1   2/3                            1/18
    # 6   4  1  0   2/3 * 3/4 = 1/2                1/18 + 1/(4*3) = 2/36 + 3/36 = 5/36
    # 8   3  0  1   1/2                            5/36
    # 9   2  1  0   1/2 * 1/2 = 1/4                5/36 + 1/(2*1) = 23/36
    # 10  1  0  1   1/4                            23/36
    np.testing.assert_array_equal(km.time, [2, 3, 5, 6, 8, 9, 10])
    np.testing.assert_array_equal(km.at_risk, [9, 8, 5, 4, 3, 2, 1])
    np.testing.assert_array_equal(km.events, [1, 2, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(km.censored, [0, 1, 1, 0, 1, 0, 1])
    s = np.array([8 / 9, 2 / 3, 2 / 3, 1 / 2, 1 / 2, 1 / 4, 1 / 4])
    np.testing.assert_allclose(km.survival, s, rtol=1e-12)
    np.testing.assert_allclose(km.reached, 1 - s, rtol=1e-12)
    sums = np.array([1 / 72, 1 / 18, 1 / 18, 5 / 36, 5 / 36, 23 / 36, 23 / 36])
    # Var S = S^2 * sum: 64/81/72 = 8/729, 4/9/18 = 2/81, 1/4*5/36 = 5/144, 1/16*23/36 = 23/576
    np.testing.assert_allclose(km.variance, [8 / 729, 2 / 81, 2 / 81, 5 / 144, 5 / 144, 23 / 576, 23 / 576],
                               rtol=1e-12)
    np.testing.assert_allclose(km.variance, s ** 2 * sums, rtol=1e-12)
    band = np.array([loglog_band(si, gi) for si, gi in zip(s, sums)])
    np.testing.assert_allclose(km.lower, band[:, 0], rtol=1e-12)
    np.testing.assert_allclose(km.upper, band[:, 1], rtol=1e-12)
    # At t=6: se = sqrt(5/36)/ln 2 = 0.5377, exp(1.96*0.5377) = 2.869: F in [1 - .5^(1/2.869), 1 - .5^2.869]
    assert km.lower[3] == pytest.approx(0.2147, abs=1e-3) and km.upper[3] == pytest.approx(0.8631, abs=1e-3)
    assert np.all((0 <= km.lower) & (km.lower <= km.reached) & (km.reached <= km.upper) & (km.upper <= 1))
    assert km.budget == 10
    assert (km.at(1.9), km.at(2), km.at(4), km.at(6), km.at(100)) == pytest.approx((0, 1 / 9, 1 / 3, 1 / 2, 3 / 4))


def test_kaplan_meier_edges_no_event_yet_and_last_run_reaching():
    km = stats.kaplan_meier([1, 2, 4], [False, True, True])
    # t=1: S=1 (censored first): band [0, 0]; t=2: n=2, S=1/2; t=4: n=1, d=1: S=0, Greenwood 1/(1*0) = inf
    np.testing.assert_allclose(km.survival, [1, 0.5, 0])
    assert (km.lower[0], km.upper[0], km.variance[0]) == (0, 0, 0)
    assert math.isnan(km.variance[2]) and math.isnan(km.lower[2]) and km.upper[2] == 1
    assert km.variance[1] == pytest.approx(0.25 * 1 / (2 * 1))


def test_kaplan_meier_rejects_bad_input():
    with pytest.raises(ValueError, match="reached has 1"):
        stats.kaplan_meier([1, 2], [True])
    with pytest.raises(ValueError, match="times="):
        stats.kaplan_meier([1, -2], [True, True])
    with pytest.raises(ValueError, match="times="):
        stats.kaplan_meier([1, float("nan")], [True, True])
    with pytest.raises(ValueError, match="times="):
        stats.kaplan_meier([], [])
    with pytest.raises(ValueError, match=r"reached\[1\]=2"):
        stats.kaplan_meier([1, 2], [True, 2])
    with pytest.raises(ValueError, match="level=1.5"):
        stats.kaplan_meier([1], [True], level=1.5)


# ---------------------------------------------------------------------------------------------
# Median

def test_median_identifiable():
    # Ten runs reaching at 10, 20, ..., 100: n_j = 11 - j, S(10 j) = 1 - j/10, and Greenwood's sum
    # telescopes: sum_{n=a}^{10} 1/(n(n-1)) = 1/(a-1) - 1/10.
    km = stats.kaplan_meier([10 * i for i in range(1, 11)], [True] * 10)
    # median: S(50) = 0.5 (computed as 9/10*8/9*...*6/7, not exactly 0.5 in floating point)
    # lower: at t=10, S=0.9, sum=1/90, se=0.10541/0.10536=1.0005, S^exp(z se) = .9^7.107 = .4729: F_upper .527
    assert km.upper[0] == pytest.approx(1 - 0.9 ** math.exp(Z * math.sqrt(1 / 90) / -math.log(0.9)), rel=1e-12)
    assert km.upper[0] == pytest.approx(0.527, abs=1e-3)
    # upper: t=70: S=.3, sum=1/3-1/10, se=.4012, .3^exp(-z se) = .5779: F_lower = .422 < .5
    #        t=80: S=.2, sum=1/2-1/10, se=.3930, .2^exp(-z se) = .4747: F_lower = .525 >= .5
    assert km.lower[6] == pytest.approx(0.422, abs=1e-3) and km.lower[7] == pytest.approx(0.525, abs=1e-3)
    m = stats.median_time(km)
    assert (m.median, m.lower, m.upper, m.budget) == (50, 10, 80, 100)
    assert stats.format_median(m) == "50 [10, 80]"


def test_median_when_half_reached_is_not_exactly_half_in_floating_point():
    # 24 runs reaching at 1..24: S(12) = 23/24 * 22/23 * ... * 12/13 = 1/2, but the float product
    # is 0.5000000000000001; the median is still 12, not 13.
    km = stats.kaplan_meier(list(range(1, 25)), [True] * 24)
    assert km.survival[11] > 0.5 and km.survival[11] == pytest.approx(0.5)
    assert stats.median_time(km).median == 12


def test_median_unidentified_upper_and_median_prints_budget():
    # The nine-run example: S(6) = 1/2 -> median 6; F_upper(2) = .567 >= .5 -> lower 2; F_lower never
    # reaches .5 (.361 at t=9, the last event) -> upper not identified.
    m = stats.median_time(stats.kaplan_meier(TIMES, REACHED))
    assert (m.median, m.lower, m.upper) == (6, 2, None)
    assert stats.format_median(m) == "6 [2, > 10]"
    # 1 of 4 reached (at 71), the others censored at the budget 400: S = 3/4 throughout, median not reached.
    km = stats.kaplan_meier([71, 400, 400, 400], [True, False, False, False])
    m = stats.median_time(km)
    assert m.median is None and m.upper is None
    # F_upper(71): S=.75, sum=1/12, se=.2887/.2877=1.0035, .75^exp(1.967) = .75^7.15 = .128 -> .872 >= .5
    assert m.lower == 71
    assert stats.format_median(m) == "> 400 [71, > 400]"
    assert stats.format_median(stats.median_time(km, budget=500)) == "> 500 [71, > 500]"
    # Nobody reached: nothing identified.
    none = stats.median_time(stats.kaplan_meier([400, 400], [False, False]))
    assert stats.format_median(none) == "> 400 [> 400, > 400]"


def test_format_number():
    assert [stats.format_number(x) for x in (400, 400.0, 7.5, 0.003, 12345.678)] == ["400", "400", "7.5", "0.003",
                                                                                      "1.235e+04"]


# ---------------------------------------------------------------------------------------------
# Paired comparison

A = {0: 10, 1: 20, 2: None, 3: None, 4: 30, 5: 30, 7: 5}
B = {0: 15, 1: 20, 2: None, 3: 50, 4: None, 5: 35, 6: 9}


def test_paired_comparison_hand_example():
    c = stats.paired_comparison(A, B, resamples=2000)
    # seed 0: 10 < 15 A; 1: 20 = 20 tie; 2: censored vs censored tie; 3: B reached, A not: B;
    # 4: A reached, B not: A; 5: 30 < 35 A.  (1 + .5 + .5 + 0 + 1 + 1) / 6 = 4/6
    assert c.scores == {0: 1.0, 1: 0.5, 2: 0.5, 3: 0.0, 4: 1.0, 5: 1.0}
    assert (c.n, c.wins, c.losses, c.ties) == (6, 3, 1, 2)
    assert c.fraction == pytest.approx(2 / 3)
    assert (c.only_a, c.only_b, c.resamples) == ([7], [6], 2000)
    assert 0 <= c.lower <= c.fraction <= c.upper <= 1 and c.lower < c.upper
    # The other way round is the complement, interval included up to resampling.
    assert stats.paired_comparison(B, A).fraction == pytest.approx(1 / 3)


def test_paired_bootstrap_is_deterministic_for_a_seed():
    first, again = stats.paired_comparison(A, B, seed=3), stats.paired_comparison(A, B, seed=3)
    assert (first.lower, first.upper) == (again.lower, again.upper)
    assert first.resamples == stats.RESAMPLES == 10_000
    # Six scores take means in multiples of 1/12: the 2.5% and 97.5% quantiles of 10,000 resamples
    # sit near the normal interval 2/3 -/+ 1.96 * sd/sqrt(6), sd = sqrt(mean(x^2) - 2/3^2) = 0.3727
    assert first.lower == pytest.approx(2 / 3 - Z * 0.3727 / math.sqrt(6), abs=0.1)
    assert first.upper == pytest.approx(min(1, 2 / 3 + Z * 0.3727 / math.sqrt(6)), abs=0.1)


def test_paired_all_wins_gives_a_degenerate_interval():
    c = stats.paired_comparison({0: 1, 1: 2}, {0: 5, 1: None})
    assert (c.fraction, c.lower, c.upper) == (1, 1, 1)


def test_paired_rejects_bad_input():
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired_comparison({0: 1}, {1: 2})
    with pytest.raises(ValueError, match=r"a\[0\]=True"):
        stats.paired_comparison({0: True}, {0: 2})
    with pytest.raises(ValueError, match="resamples=0"):
        stats.paired_comparison({0: 1}, {0: 2}, resamples=0)


# ---------------------------------------------------------------------------------------------
# Search edges and extension

AXES = {"lr": [1e-3, 3e-3, 1e-2], "weight_decay": [0.0, 1e-3, 1e-2, 1e-1], "beta1": [0.9],
        "beta2": [0.98, 0.99, 0.999]}
BOUNDS = {"weight_decay": (0, None), "beta2": (0, 0.999)}


def test_edges_corner_and_interior():
    best = {"lr": 1e-2, "weight_decay": 1e-3, "beta1": 0.9, "beta2": 0.99, "warmup_steps": 10}
    e = stats.search_edges(AXES, best, BOUNDS)
    assert set(e) == set(AXES)                                            # warmup_steps not swept: ignored
    assert (e["lr"].position, e["lr"].low, e["lr"].high, e["lr"].extend) == ("high", False, True, ("high",))
    assert (e["weight_decay"].position, e["weight_decay"].extend) == ("interior", ())
    assert (e["beta2"].position, e["beta2"].extend) == ("interior", ())
    assert (e["beta1"].position, e["beta1"].low, e["beta1"].high) == ("single", True, True)
    assert e["beta1"].extend == ("low", "high")
    assert e["lr"].describe() == "lr=0.01: high edge of [0.001 .. 0.01]; extend high"


def test_edges_low_corner_at_bounds():
    best = {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999}
    e = stats.search_edges(AXES, best, BOUNDS, fixed=["beta1"])
    assert (e["lr"].position, e["lr"].extend) == ("low", ("low",))
    wd = e["weight_decay"]
    assert (wd.position, wd.low_blocked, wd.extend) == ("low", True, ())     # at its bound 0
    b2 = e["beta2"]
    assert (b2.position, b2.high_blocked, b2.extend) == ("high", True, ())   # 0.999 is the bound
    assert "can't extend" in b2.describe()
    assert (e["beta1"].position, e["beta1"].low, e["beta1"].high, e["beta1"].extend) == ("fixed", False, False, ())


def test_edges_zero_on_a_log_axis_is_a_natural_bound_without_bounds():
    e = stats.search_edges({"weight_decay": [0.0, 1e-3, 1e-2, 1e-1]}, {"weight_decay": 0.0})
    assert (e["weight_decay"].low_blocked, e["weight_decay"].extend) == (True, ())


def test_edges_reject_bad_input():
    with pytest.raises(ValueError, match=r"best\['lr'\]=0.5 is not among"):
        stats.search_edges({"lr": [1e-3, 1e-2]}, {"lr": 0.5})
    with pytest.raises(ValueError, match="no value for swept knob 'lr'"):
        stats.search_edges({"lr": [1e-3]}, {})
    with pytest.raises(ValueError, match=r"bounds for \['wd'\]"):
        stats.search_edges({"lr": [1e-3]}, {"lr": 1e-3}, {"wd": (0, 1)})


def test_extend_geometric_exact_and_half_decade():
    x3 = stats.extend_axis([1e-3, 3e-3], "high", count=2)
    assert (x3.values, x3.spacing, x3.at_bound) == ((9e-3, 2.7e-2), "geometric", False)  # exact x3, no rounding
    assert stats.extend_axis([1e-3, 3e-3], "low").values == (pytest.approx(1e-3 / 3),)
    half = stats.extend_axis([1e-3, 3e-3, 1e-2], "high", count=2)          # ratios 3, 3.33: a rounded log grid
    assert half.values == (3e-2, 1e-1)                                     # sqrt(10) steps snapped to 1, 3
    assert stats.extend_axis([3e-4, 1e-3, 3e-3], "high").values == (1e-2,)  # 3e-3 * 3.162 = 9.49e-3 -> 1e-2
    assert stats.extend_axis([1e-3, 3e-3, 1e-2], "low").values == (3e-4,)
    raw = stats.extend_axis([1e-3, 3e-3, 1e-2], "high", nice=False).values
    assert raw == (pytest.approx(1e-2 * math.sqrt(10)),)


def test_extend_arithmetic_and_bounds():
    a = stats.extend_axis([0.1, 0.2, 0.3], "high", count=2)
    assert (a.values, a.spacing) == ((0.4, 0.5), "arithmetic")
    assert stats.extend_axis([0.1, 0.2, 0.3], "low", count=3).values == (0.0, -0.1, -0.2)   # no bound given
    clipped = stats.extend_axis([0.1, 0.2, 0.3], "low", count=3, bounds=(0.05, 1))
    assert clipped.values == (0.05,) and "clipped" in clipped.note                    # 0.0 < 0.05 -> the bound
    exact_bound = stats.extend_axis([0.98, 0.99], "high", count=3, bounds=(0, 1.0), spacing="arithmetic")
    assert exact_bound.values == (1.0,) and exact_bound.note == "reached the high bound 1"
    at = stats.extend_axis([0.98, 0.99, 0.999], "high", bounds=(0, 0.999))
    assert (at.values, at.at_bound) == ((), True) and "can't extend" in at.note
    assert stats.extend_axis([1e-3, 1e-2], "high", count=3, bounds=(None, 0.5)).values == (0.1, 0.5)


def test_extend_log_axis_with_zero():
    wd = [0.0, 1e-3, 1e-2, 1e-1]
    high = stats.extend_axis(wd, "high", count=2)
    assert (high.values, high.spacing) == ((1.0, 10.0), "geometric")     # ratio 10 from the non-zero values
    low = stats.extend_axis(wd, "low")
    assert (low.values, low.at_bound) == ((), True) and "natural low bound" in low.note
    bounded = stats.extend_axis(wd, "low", bounds=(0, None))
    assert (bounded.values, bounded.spacing, bounded.at_bound) == ((), "geometric", True)
    assert stats.extend_axis([0.0, 1e-3, 1e-2], "high").values == (0.1,)


def test_extend_irregular_single_and_bad_input():
    # The sweep's weight decay grid: ratios 10, 10, 3 -> irregular; outer ratio 3 from 0.3 is 0.9,
    # snapped to the grid's mantissas {1, 3}: 1.
    irr = stats.extend_axis([0.0, 0.001, 0.01, 0.1, 0.3], "high")
    assert (irr.values, irr.spacing) == ((1.0,), "irregular")
    one = stats.extend_axis([0.9], "high")
    assert one.values == () and not one.at_bound and "step=" in one.note
    assert stats.extend_axis([0.9], "high", spacing="arithmetic", step=0.05).values == (0.95,)
    assert stats.extend_axis([1e-3], "low", spacing="geometric", step=10).values == (1e-4,)
    with pytest.raises(ValueError, match="side='up'"):
        stats.extend_axis([1, 2], "up")
    with pytest.raises(ValueError, match="strictly increasing"):
        stats.extend_axis([2, 1], "high")
    with pytest.raises(ValueError, match="step=0.5 must be > 1"):
        stats.extend_axis([1, 2], "high", spacing="geometric", step=0.5)


def test_suggest_extensions():
    best = {"lr": 1e-2, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99}
    s = stats.suggest_extensions(AXES, best, BOUNDS, fixed=["beta1"])
    assert set(s) == {"lr", "weight_decay"}
    assert s["lr"]["high"].values == (3e-2,)
    assert s["weight_decay"]["low"].at_bound and s["weight_decay"]["low"].values == ()


# ---------------------------------------------------------------------------------------------
# Tuning sensitivity

POINTS = {"p1": [10, 20, None], "p2": [None, None, 30], "p3": [None, None, None], "p4": [5, 6, 7],
          "p5": [10, None]}


def test_tuning_sensitivity_rules():
    # median: p1 (2 of 3), p4; p5 is exactly half -> no. any: p1, p2, p4, p5. all: p4.
    assert stats.tuning_sensitivity(POINTS) == (5, 2, 0.4, 6 / 3, "median")
    assert stats.tuning_sensitivity(POINTS, rule="any") == (5, 4, 0.8, 6 / 5, "any")
    assert stats.tuning_sensitivity(list(POINTS.values()), rule="all") == (5, 1, 0.2, 6 / 2, "all")
    assert stats.tuning_sensitivity([[None], [None]]).expected_trials == math.inf
    with pytest.raises(ValueError, match="rule='mean'"):
        stats.tuning_sensitivity(POINTS, rule="mean")
    with pytest.raises(ValueError, match=r"times\[0\]=False"):
        stats.tuning_sensitivity([[False]])


@pytest.mark.parametrize("n,k", [(5, 2), (6, 1), (4, 4), (7, 3)])
def test_expected_trials_matches_enumeration(n, k):
    # Average position (1-based) of the first success over all arrangements of k successes among n.
    positions = [next(i for i, s in enumerate(c, 1) if s)
                 for c in itertools.permutations([True] * k + [False] * (n - k))]
    assert stats.expected_trials(n, k) == pytest.approx(sum(positions) / len(positions))


def test_expected_trials_rejects_bad_counts():
    assert stats.expected_trials(3, 0) == math.inf
    with pytest.raises(ValueError, match="n=3, k=4"):
        stats.expected_trials(3, 4)


# ---------------------------------------------------------------------------------------------
# First and sustained reaching

ACC = [0.1, 0.5, 0.92, 0.85, 0.93, 0.96, 0.99, 0.97]
ROWS = [{"epoch": e, "step": 10 * e, "val_acc": a} for e, a in enumerate(ACC, 1)]


def test_sustained_after_a_dip():
    assert stats.first_reaching(ROWS, 0.9) == (3, 30)
    assert stats.sustained_reaching(ROWS, 0.9) == (5, 50)      # 0.92 at epoch 3, dips to 0.85, back at 5
    assert stats.sustained_reaching(ROWS, 0.95) == (6, 60)
    assert stats.sustained_reaching(ROWS, 0.99) is None        # the last row (0.97) is below
    assert stats.sustained_reaching([], 0.9) is None
    nan_last = ROWS + [{"epoch": 9, "step": 90, "val_acc": float("nan")}]
    assert stats.sustained_reaching(nan_last, 0.5) is None


def test_reaching_times_for_thresholds():
    t = stats.reaching_times(ROWS)
    assert list(t) == [0.9, 0.95, 0.99]
    assert t[0.9] == ((3, 30), (5, 50))
    assert t[0.95] == ((6, 60), (6, 60))
    assert t[0.99] == ((7, 70), None)
    assert stats.reaching_times(ROWS, [0.995])[0.995] == (None, None)
    assert t[0.9].first.epoch == 3 and t[0.9].sustained.step == 50


def test_reaching_rejects_bad_rows():
    with pytest.raises(ValueError, match=r"rows\[1\] has no 'val_acc'"):
        stats.first_reaching([{"epoch": 1, "step": 1, "val_acc": 0.1}, {"epoch": 2, "step": 2}], 0.9)
    with pytest.raises(ValueError, match=r"rows\[1\] step=5"):
        stats.sustained_reaching([{"epoch": 1, "step": 10, "val_acc": 1}, {"epoch": 2, "step": 5, "val_acc": 1}], 0.9)
    with pytest.raises(ValueError, match="threshold=None"):
        stats.first_reaching(ROWS, None)


# ---------------------------------------------------------------------------------------------

def test_module_is_pure():
    """Loaded on its own, sweeps/stats.py imports neither mlx, matplotlib nor the repository."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('stats', {str(ROOT / 'sweeps' / 'stats.py')!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'matplotlib', 'scipy', 'main', 'sweeps', 'optimizers', 'fastblas', 'models', 'data')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
