"""Statistics for comparing optimizers on time to a target validation accuracy.

A run either reaches the target at some time (epochs, steps, seconds: any unit, plain numbers) or
never does within its budget, and then it is right-censored at the last time observed. Everything
here is pure (numpy and the standard library), so it can be tested and reused without MLX.

- ``kaplan_meier``: the fraction of runs reached by time t, F(t) = 1 - S(t), with a 95% band
  (Greenwood's variance, log(-log) transform).
- ``median_time`` / ``format_median``: the median time to target and its interval from that band
  (Brookmeyer-Crowley style), printed as "> budget" where it is not identified.
- ``paired_comparison``: per seed, which of two optimizers reaches the target first, with a
  seeded percentile bootstrap over seeds.
- ``search_edges`` / ``extend_axis`` / ``suggest_extensions``: whether a best point sits on the
  edge of its search grid, and the next grid values outward.
- ``tuning_sensitivity`` / ``expected_trials``: how much of a search space reaches the target.
- ``first_reaching`` / ``sustained_reaching`` / ``reaching_times``: from one run's metric rows.
"""
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

EPS = 1e-9  # slack for comparing products of fractions with 0.5 (8/9 * 6/8 * 3/4 is not exactly 1/2)
RESAMPLES = 10_000


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _is_reached(value, name: str) -> bool:
    """A time to target is reached unless it is None or nan; bools are refused (False would read as 0)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} must be a time or None, not a bool")
    if value is None:
        return False
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={value!r} must be a number or None")
    if math.isnan(value):
        return False
    if math.isinf(value):
        raise ValueError(f"{name}={value!r} must be finite (use None for never reached)")
    return True


def format_number(x: float) -> str:
    """``400`` for whole numbers, else 4 significant digits (``7.5``, ``0.003``)."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


# ---------------------------------------------------------------------------------------------
# Kaplan-Meier

@dataclass(frozen=True)
class KaplanMeier:
    """The Kaplan-Meier step function, one row per distinct observed time (events or censorings).

    ``reached[j]`` = F(t) = 1 - S(t) holds on ``[time[j], time[j+1])``; before ``time[0]`` it is 0.
    ``at_risk[j]`` counts runs with time >= ``time[j]`` (a run censored at ``time[j]`` is still at
    risk there: events come before censorings at the same time). ``variance`` is Greenwood's
    variance of S; ``lower``/``upper`` bound F pointwise at ``level``. ``budget`` is the largest
    time observed.
    """
    time: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    censored: np.ndarray
    survival: np.ndarray
    reached: np.ndarray
    variance: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    budget: float

    def at(self, t: float) -> float:
        """F(t): the estimated fraction of runs that have reached the target by time ``t``."""
        j = int(np.searchsorted(self.time, t, side="right")) - 1
        return 0.0 if j < 0 else float(self.reached[j])


def kaplan_meier(times: Sequence[float], reached: Sequence[bool], level: float = 0.95) -> KaplanMeier:
    """Kaplan-Meier estimate of the fraction of runs that reached the target by each time.

    ``times[i]`` is when run i reached the target, or the last time it was observed (its budget)
    when ``reached[i]`` is False. With n_j at risk and d_j events at time t_j:

        S(t) = prod_{t_j <= t} (1 - d_j / n_j),    F = 1 - S
        Var S(t) = S(t)^2 * sum_{t_j <= t} d_j / (n_j (n_j - d_j))          (Greenwood)

    The band uses theta = log(-log S), se(theta) = sqrt(sum d/(n(n-d))) / |log S|, so
    S in [S^exp(z se), S^exp(-z se)], which stays in [0, 1]; F's band is 1 minus that. Where
    S = 1 (no event yet) the band is [0, 0]. Where S = 0 (the last run at risk reached) Greenwood's
    sum is infinite: the variance and F's lower limit are nan and F's upper limit is 1.
    """
    t = np.asarray(times, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"times={times!r} must be a non-empty 1-D sequence")
    flags = list(reached)
    if len(flags) != t.size:
        raise ValueError(f"reached has {len(flags)} entries but times has {t.size}")
    for i, f in enumerate(flags):
        if f not in (True, False):
            raise ValueError(f"reached[{i}]={f!r} must be a bool")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"times={times!r} must be finite and >= 0")
    d = np.asarray(flags, dtype=bool)
    z = _z(level)

    grid = np.unique(t)                                                    # sorted distinct times
    events = np.array([np.sum(d & (t == g)) for g in grid])
    censored = np.array([np.sum(~d & (t == g)) for g in grid])
    at_risk = np.array([np.sum(t >= g) for g in grid])
    survival = np.cumprod(1 - events / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(events > 0, events / (at_risk * (at_risk - events)), 0.0)  # inf where d = n
        greenwood = np.cumsum(terms)
        variance = np.where(survival > 0, survival ** 2 * greenwood, np.nan)
        log_s = np.log(survival)
        se = np.sqrt(greenwood) / np.abs(log_s)
        s_low, s_high = survival ** np.exp(z * se), survival ** np.exp(-z * se)
    lower = np.where(survival >= 1, 0.0, np.where(survival > 0, 1 - s_high, np.nan))
    upper = np.where(survival >= 1, 0.0, np.where(survival > 0, 1 - s_low, 1.0))
    return KaplanMeier(time=grid, at_risk=at_risk, events=events, censored=censored, survival=survival,
                       reached=1 - survival, variance=variance, lower=lower, upper=upper, level=level,
                       budget=float(t.max()))


# ---------------------------------------------------------------------------------------------
# Median time to target

@dataclass(frozen=True)
class Median:
    """Median time to target and its interval; None where not identified (beyond ``budget``)."""
    median: Optional[float]
    lower: Optional[float]
    upper: Optional[float]
    level: float
    budget: float


def _first_time(km: KaplanMeier, values: np.ndarray) -> Optional[float]:
    hit = np.nonzero(values >= 0.5 - EPS)[0]   # nan compares False: not reached
    return float(km.time[hit[0]]) if hit.size else None


def median_time(km: KaplanMeier, budget: Optional[float] = None) -> Median:
    """Median time to target from a Kaplan-Meier estimate, with its interval at ``km.level``.

    median = the first time F(t) >= 1/2 (the smallest t with S(t) <= 1/2; where S is exactly 1/2
    over an interval this takes its start, where R's survfit takes the midpoint). The interval is
    the set of t whose band straddles 1/2 (Brookmeyer and Crowley 1982, as R's survfit does it):
    lower = the first time the band's upper limit of F reaches 1/2, upper = the first time its
    lower limit does. Each is None when it never happens within the data: fewer than half reached
    (median), or too few runs to bound it (upper). ``budget`` (default ``km.budget``, the largest
    time observed) is what ``format_median`` prints as "> budget".
    """
    budget = km.budget if budget is None else budget
    if not math.isfinite(budget):
        raise ValueError(f"budget={budget} must be finite")
    return Median(median=_first_time(km, km.reached), lower=_first_time(km, km.upper),
                  upper=_first_time(km, km.lower), level=km.level, budget=budget)


def format_median(m: Median) -> str:
    """``"71 [52, 90]"``; a value not identified prints as ``"> budget"``: ``"71 [52, > 400]"``."""
    def show(x):
        return f"> {format_number(m.budget)}" if x is None else format_number(x)
    return f"{show(m.median)} [{show(m.lower)}, {show(m.upper)}]"


# ---------------------------------------------------------------------------------------------
# Paired comparison per seed

@dataclass(frozen=True)
class PairedComparison:
    """Seeds where A reached the target first. ``fraction`` = (wins + ties / 2) / n over the n
    common seeds; ``lower``/``upper`` is its percentile-bootstrap interval from ``resamples``
    resamples of the seeds; ``scores`` is 1 (A first), 0.5 (tie) or 0 (B first) per seed;
    ``only_a``/``only_b`` are seeds present for one optimizer only (ignored)."""
    n: int
    wins: int
    losses: int
    ties: int
    fraction: float
    lower: float
    upper: float
    level: float
    resamples: int
    scores: dict
    only_a: list
    only_b: list


def paired_comparison(a: Mapping, b: Mapping, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> PairedComparison:
    """How often optimizer A reaches the target before optimizer B on the same seed.

    ``a`` and ``b`` map seed -> time to target, None (or nan) when the run never reached it within
    the budget; both optimizers are assumed to share the budget. A wins a seed when it reaches
    strictly earlier (a reached run beats a censored one); equal times and censored vs censored are
    ties, worth 1/2. The interval resamples the common seeds with replacement ``resamples`` times
    (``np.random.default_rng(seed)``, so it is deterministic) and takes the (1-level)/2 and
    (1+level)/2 quantiles of the resampled fractions.
    """
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    _z(level)  # validates level
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no seed in common: a has {sorted(a)}, b has {sorted(b)}")
    scores = {}
    for s in common:
        ra, rb = _is_reached(a[s], f"a[{s!r}]"), _is_reached(b[s], f"b[{s!r}]")
        if ra and rb:
            scores[s] = 1.0 if a[s] < b[s] else 0.0 if a[s] > b[s] else 0.5
        else:
            scores[s] = 1.0 if ra and not rb else 0.0 if rb and not ra else 0.5
    x = np.array([scores[s] for s in common])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lower, upper = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    values = list(scores.values())
    return PairedComparison(n=x.size, wins=values.count(1.0), losses=values.count(0.0), ties=values.count(0.5),
                            fraction=float(x.mean()), lower=float(lower), upper=float(upper), level=level,
                            resamples=resamples, scores=scores, only_a=sorted(set(a) - set(b)),
                            only_b=sorted(set(b) - set(a)))


# ---------------------------------------------------------------------------------------------
# Search edges and extension

class Extension(NamedTuple):
    """Next values outward along an axis: ``values`` (possibly empty), the ``spacing`` used
    ("geometric", "arithmetic", "irregular" or "" when none), ``at_bound`` (True when the axis
    already touches a bound on that side, so it can't be extended) and a human ``note``."""
    values: tuple
    spacing: str
    at_bound: bool
    note: str


EXACT = 1e-6   # relative spread under which a grid's steps count as equal
LOOSE = 0.25   # relative spread under which they count as nearly equal (a 1-3-10 half-decade grid)


def _spread(steps: np.ndarray) -> float:
    """Largest relative deviation of ``steps`` from their mean (inf when the mean is 0)."""
    mean = steps.mean()
    return float(np.max(np.abs(steps / mean - 1))) if mean != 0 else math.inf


def _round_sig(x: float, scale: Optional[float] = None, digits: int = 12) -> float:
    """``x`` to ``digits`` significant digits of ``scale`` (default ``|x|``): removes float noise such
    as 0.009000000000000001, or 1.4e-17 for 0.1 - 0.1 (scale 0.1)."""
    scale = abs(x) if scale is None else abs(scale)
    return float(round(x, digits - 1 - math.floor(math.log10(scale)))) if scale > 0 else 0.0


def _mantissas(values: np.ndarray) -> set:
    out = set()
    for v in values[values > 0]:
        m = round(float(v) / 10 ** math.floor(math.log10(v)), 9)
        out.add(m / 10 if m >= 10 else m)
    return out


def _snap(x: float, mantissas: set) -> float:
    """``x`` moved to the nearest (in log) value m * 10^k with m one of the grid's mantissas."""
    e = math.floor(math.log10(x))
    candidates = [_round_sig(m * 10.0 ** k) for m in mantissas for k in (e - 1, e, e + 1)]
    return min(candidates, key=lambda c: abs(math.log(c) - math.log(x)))


def _spacing(v: np.ndarray) -> str:
    """'geometric' or 'arithmetic' when the grid's steps are (nearly) constant, else 'irregular'."""
    diffs = np.diff(v)
    pos = v[v > 0]
    log_ratios = np.diff(np.log(pos)) if pos.size >= 2 else None
    arith = _spread(diffs) if diffs.size else math.inf
    geom = _spread(log_ratios) if log_ratios is not None else math.inf
    if v.size >= 3 and arith <= EXACT:
        return "arithmetic"
    if geom <= EXACT:
        return "geometric"
    if arith <= EXACT:
        return "arithmetic"
    if min(arith, geom) <= LOOSE:
        return "geometric" if geom < arith else "arithmetic"
    return "irregular"


def extend_axis(values: Sequence[float], side: str, count: int = 1, bounds: Optional[tuple] = None,
                nice: bool = True, spacing: Optional[str] = None, step: Optional[float] = None) -> Extension:
    """The next ``count`` values beyond the tried ``values`` (sorted, increasing) on ``side``
    ("low" or "high"), using the axis's own step.

    Spacing (``spacing=None`` detects it): arithmetic when the differences are equal (three or
    more values), geometric when the ratios of consecutive positive values are equal (two positive
    values count as geometric: 1e-3, 3e-3 -> 9e-3), otherwise whichever of the two is nearly
    constant (within 25%) with the smaller spread, otherwise "irregular", which extends by the
    outermost step (geometrically when the two outer values are positive). A 0 in a log axis
    (weight decay 0, 1e-3, 1e-2, 0.1) is left out of the ratios and is its natural low bound.
    The geometric step is the mean log ratio, the arithmetic one the mean difference; ``step``
    overrides it (a ratio or a difference), which a one-value axis needs.

    Exact grids continue exactly (x3: 9e-3, 2.7e-2). ``nice=True`` rounds the values of an
    inexact geometric grid to the grid's own mantissas: the half-decade 1e-3, 3e-3, 1e-2 ->
    3e-2, 1e-1 rather than 3.16e-2, 1e-1. ``bounds=(lo, hi)`` (inclusive, None for open): a value
    past the bound is replaced by the bound itself and extension stops there; when the axis
    already reaches the bound nothing is returned, with ``at_bound=True``.
    """
    if side not in ("low", "high"):
        raise ValueError(f"side={side!r} must be 'low' or 'high'")
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    if spacing not in (None, "geometric", "arithmetic"):
        raise ValueError(f"spacing={spacing!r} must be None, 'geometric' or 'arithmetic'")
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"values={values!r} must be a non-empty sequence of finite numbers")
    if np.any(np.diff(v) <= 0):
        raise ValueError(f"values={values!r} must be strictly increasing")
    lo, hi = (None, None) if bounds is None else bounds
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"bounds={bounds!r} must have lo <= hi")
    up = side == "high"
    edge = float(v[-1] if up else v[0])
    bound = hi if up else lo
    kind = spacing or (_spacing(v) if v.size >= 2 else "")
    detected, irregular_note = kind, ""
    if bound is not None and (edge >= bound if up else edge <= bound):
        return Extension((), kind, True, f"{format_number(edge)} is at the {side} bound {format_number(bound)}: "
                                          "can't extend")
    pos = v[v > 0]
    if kind == "geometric" and not up and v[0] <= 0:
        return Extension((), kind, True, f"{format_number(edge)} is the natural low bound of a log axis")
    if step is None:
        if kind == "geometric" and pos.size >= 2:
            step = float(np.exp(np.diff(np.log(pos)).mean()))
        elif kind == "arithmetic" and v.size >= 2:
            step = float(np.diff(v).mean())
        elif kind == "irregular":
            outer = v[-2:] if up else v[:2]
            kind = "geometric" if np.all(outer > 0) else "arithmetic"
            step = float(outer[1] / outer[0] if kind == "geometric" else outer[1] - outer[0])
            irregular_note = "irregular grid: extended by its outermost " + (
                "ratio" if kind == "geometric" else "difference")
        else:
            what = "one value" if v.size == 1 else f"{v.size} values"
            return Extension((), kind, False, f"{what} tried: no {kind or 'step'} to extend by (pass step=)")
    elif kind == "":
        raise ValueError(f"step={step} needs spacing='geometric' or 'arithmetic' for values={values!r}")
    if kind == "geometric" and not step > 1:
        raise ValueError(f"step={step} must be > 1 for a geometric axis")
    if kind == "arithmetic" and not step > 0:
        raise ValueError(f"step={step} must be > 0 for an arithmetic axis")
    if kind == "geometric" and edge <= 0:
        raise ValueError(f"values={values!r}: a geometric axis can't extend from {edge}")

    exact = kind == "geometric" and pos.size >= 2 and _spread(np.diff(np.log(pos))) <= EXACT
    mantissas = _mantissas(v) if nice and kind == "geometric" and not exact else set()
    out, prev, note = [], edge, ""
    for k in range(1, count + 1):
        if kind == "geometric":
            x = edge * step ** k if up else edge / step ** k
        else:
            x = edge + k * step if up else edge - k * step
        x = _round_sig(x, None if kind == "geometric" else max(abs(edge), step))
        if mantissas:
            snapped = _snap(x, mantissas)
            x = snapped if (snapped > prev if up else snapped < prev) else x
        if bound is not None and (x >= bound if up else x <= bound):
            out.append(float(bound))
            note = f"{'reached' if x == bound else 'clipped to'} the {side} bound {format_number(bound)}"
            break
        out.append(x)
        prev = x
    if irregular_note:
        note = irregular_note + (f"; {note}" if note else "")
    return Extension(tuple(out), detected if irregular_note else kind, False, note)


@dataclass(frozen=True)
class Edge:
    """Where a best point's value sits on one swept axis.

    ``position``: "low", "high", "interior", "single" (one value tried: an edge on both sides) or
    "fixed" (one value, marked fixed: no edge). ``low``/``high``: the best is at that edge of
    what was tried. ``low_blocked``/``high_blocked``: at that edge and at a bound (or 0 on a log
    axis), so the search can't extend there. ``extend`` lists the sides worth extending.
    """
    knob: str
    value: object
    values: tuple
    position: str
    low: bool
    high: bool
    low_blocked: bool
    high_blocked: bool

    @property
    def extend(self) -> tuple:
        """The sides ("low", "high") where the best is at an edge that is not blocked by a bound."""
        return tuple(s for s, edge, blocked in (("low", self.low, self.low_blocked),
                                                ("high", self.high, self.high_blocked)) if edge and not blocked)

    def describe(self) -> str:
        """One line, e.g. ``lr=0.01: high edge of [0.001 .. 0.01]; extend high``."""
        tried = self.values[0] if len(self.values) == 1 else f"{self.values[0]} .. {self.values[-1]}"
        text = f"{self.knob}={self.value}: {self.position}" + ("" if self.position in ("single", "fixed", "interior")
                                                               else " edge") + f" of [{tried}]"
        blocked = [s for s, b in (("low", self.low_blocked), ("high", self.high_blocked)) if b]
        if blocked:
            text += f"; at the {' and '.join(blocked)} bound, can't extend there"
        if self.extend:
            text += f"; extend {' and '.join(self.extend)}"
        return text


def _index(values: Sequence, value) -> Optional[int]:
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and isinstance(value, (int, float)) and not isinstance(v, bool):
            if math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-15):
                return i
        elif v == value:
            return i
    return None


def search_edges(axes: Mapping[str, Sequence], best: Mapping[str, object],
                 bounds: Optional[Mapping[str, tuple]] = None, fixed: Sequence[str] = ()) -> dict:
    """``{knob: Edge}``: for each swept axis, whether ``best[knob]`` is at the low edge, the high
    edge or inside the values tried (``axes[knob]``, sorted increasing). A one-value axis is
    "single" (an edge on both sides) unless its knob is in ``fixed``. ``bounds`` maps knob ->
    (lo, hi), inclusive, None for open; a best value at an edge that is also at its bound (or is 0
    on a log axis) is blocked there: the search can't extend past it. Knobs of ``best`` that are
    not in ``axes`` are not swept and are ignored.
    """
    bounds = bounds or {}
    unknown = set(bounds) - set(axes)
    if unknown:
        raise ValueError(f"bounds for {sorted(unknown)} name no swept axis (axes: {sorted(axes)})")
    edges = {}
    for knob, values in axes.items():
        values = list(values)
        if not values:
            raise ValueError(f"axes[{knob!r}] is empty")
        if knob not in best:
            raise ValueError(f"best has no value for swept knob {knob!r}")
        i = _index(values, best[knob])
        if i is None:
            raise ValueError(f"best[{knob!r}]={best[knob]!r} is not among the values tried {values}")
        m = len(values)
        if m == 1:
            position = "fixed" if knob in fixed else "single"
        else:
            position = "low" if i == 0 else "high" if i == m - 1 else "interior"
        low = position in ("low", "single")
        high = position in ("high", "single")
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

        def blocked(side, at_edge):
            if not (at_edge and numeric):
                return False
            return extend_axis(values, side, bounds=bounds.get(knob)).at_bound
        edges[knob] = Edge(knob=knob, value=best[knob], values=tuple(values), position=position, low=low, high=high,
                           low_blocked=blocked("low", low), high_blocked=blocked("high", high))
    return edges


def suggest_extensions(axes: Mapping[str, Sequence], best: Mapping[str, object],
                       bounds: Optional[Mapping[str, tuple]] = None, fixed: Sequence[str] = (),
                       count: int = 1, nice: bool = True) -> dict:
    """``{knob: {side: Extension}}`` for every side where ``best`` is at an edge of its search
    (as ``search_edges`` decides) and the values are numeric, blocked sides included (with no values)."""
    bounds = bounds or {}
    out = {}
    for knob, edge in search_edges(axes, best, bounds, fixed).items():
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in edge.values):
            continue
        sides = {s: extend_axis(edge.values, s, count, bounds.get(knob), nice)
                 for s, at in (("low", edge.low), ("high", edge.high)) if at}
        if sides:
            out[knob] = sides
    return out


# ---------------------------------------------------------------------------------------------
# Tuning sensitivity

class Sensitivity(NamedTuple):
    """``k`` of the ``n`` searched points reach the target (``share`` = k / n) under ``rule``;
    ``expected_trials`` = (n + 1) / (k + 1), inf when k = 0."""
    n: int
    k: int
    share: float
    expected_trials: float
    rule: str


def expected_trials(n: int, k: int) -> float:
    """Expected number of points drawn uniformly without replacement from n, of which k succeed,
    up to and including the first success: (n + 1) / (k + 1); inf when k = 0 (never)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"n={n}, k={k} must satisfy n >= 1 and 0 <= k <= n")
    return math.inf if k == 0 else (n + 1) / (k + 1)


RULES = ("median", "any", "all")


def point_reaches(times: Sequence[Optional[float]], rule: str = "median") -> bool:
    """Whether a searched point reaches the target, from its seeds' times (None = never).

    "median": its censored median is reached, i.e. more than half of its seeds reach (with exactly
    half the median falls between a reached time and never, and counts as never, as
    ``sweeps.runner.censored_median`` does); "any": at least one seed; "all": every seed.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} must be one of {RULES}")
    times = list(times)
    if not times:
        raise ValueError("times is empty: a point needs at least one seed")
    hits = sum(_is_reached(t, f"times[{i}]") for i, t in enumerate(times))
    return {"median": 2 * hits > len(times), "any": hits > 0, "all": hits == len(times)}[rule]


def tuning_sensitivity(points, rule: str = "median") -> Sensitivity:
    """Share of an optimizer's searched points that reach the target within the budget, and the
    expected number of random trials to find one. ``points`` is a mapping point -> per-seed times
    (None = never reached) or a sequence of such lists; ``rule`` is as in ``point_reaches``."""
    lists = list(points.values()) if isinstance(points, Mapping) else list(points)
    if not lists:
        raise ValueError("points is empty")
    k = sum(point_reaches(times, rule) for times in lists)
    n = len(lists)
    return Sensitivity(n=n, k=k, share=k / n, expected_trials=expected_trials(n, k), rule=rule)


# ---------------------------------------------------------------------------------------------
# Times from one run's metric rows

class Reach(NamedTuple):
    """When a run's metric row was logged: its epoch and optimizer step."""
    epoch: int
    step: int


class Crossing(NamedTuple):
    """First evaluation at or above a threshold, and the first from which it stays there."""
    first: Optional[Reach]
    sustained: Optional[Reach]


def _check_rows(rows: Sequence[Mapping], key: str) -> None:
    last = -math.inf
    for i, row in enumerate(rows):
        for k in ("epoch", "step", key):
            if k not in row:
                raise ValueError(f"rows[{i}] has no {k!r}: {dict(row)}")
        if row["step"] < last:
            raise ValueError(f"rows[{i}] step={row['step']} comes after step={last}: rows must be ordered")
        last = row["step"]


def _check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r} must be a finite number")


def first_reaching(rows: Sequence[Mapping], threshold: float, key: str = "val_acc") -> Optional[Reach]:
    """``Reach(epoch, step)`` of the first row with ``row[key] >= threshold``, None if none (nan is below)."""
    _check_threshold(threshold)
    _check_rows(rows, key)
    for row in rows:
        if row[key] >= threshold:
            return Reach(row["epoch"], row["step"])
    return None


def sustained_reaching(rows: Sequence[Mapping], threshold: float, key: str = "val_acc") -> Optional[Reach]:
    """``Reach(epoch, step)`` of the first row from which ``row[key] >= threshold`` holds to the
    last row; None if the last row is below (or there are no rows). A run that reaches the
    threshold, dips below and recovers is timed from the recovery."""
    _check_threshold(threshold)
    _check_rows(rows, key)
    start = None
    for row in reversed(rows):
        if not row[key] >= threshold:
            break
        start = row
    return None if start is None else Reach(start["epoch"], start["step"])


def reaching_times(rows: Sequence[Mapping], thresholds: Sequence[float] = (0.9, 0.95, 0.99),
                   key: str = "val_acc") -> dict:
    """``{threshold: Crossing(first, sustained)}`` for each threshold."""
    return {t: Crossing(first_reaching(rows, t, key), sustained_reaching(rows, t, key)) for t in thresholds}
