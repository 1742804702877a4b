"""Verdicts an optimizer author would trust: select on some seeds, report on others.

An optimizer sweep (``python -m sweeps optimizers``) runs in three phases, each an ordinary sweep through
``runner.run_sweep`` (so every phase is resumable and skips what is done):

1. **Tuning** on the tuning seeds (``--seeds``): every optimizer over its search space. Each
   optimizer's best point is the one ``results.rank_key`` puts first (the Kaplan-Meier median of
   optimizer steps to the target, then the fraction of seeds reaching it).
2. **Extension** (``--extend``): where a best point sits on the edge of a swept axis (numeric, two or
   more values; ``stats.search_edges``), the next value outward (``stats.extend_axis`` with the axis's
   own step, geometric for the registry's log knobs, bounded by the knob's ``limits``) is added to that
   optimizer's grid and run; repeated until every best is interior, a bound stops it, or
   ``--extend-rounds`` rounds are spent.
3. **Confirmation** on the confirmation seeds (``--confirm-seeds``, disjoint from the tuning seeds):
   each optimizer's best configuration is rerun into ``DIR/confirm/``. The headline (``verdict.csv``,
   ``verdict.md``, the console, ``best_all.png`` and ``survival.png``) uses these runs alone.

``compute(out)`` rebuilds the verdict from the run directories and ``sweep.json`` without running
anything (``python -m sweeps table DIR [--target T]``).
"""
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from config import short_name
from optimizers import OPTIMIZERS
from sweeps import results, stats
from sweeps.runner import run_sweep
from sweeps.spec import Spec, expand, is_hyperparameter, uses

CONFIRM_SEEDS = [1000, 1001, 1002, 1003, 1004]
CONFIRM_DIR = "confirm"
EXTEND_ROUNDS = 4
KEEP = object()  # compute(out, target=KEEP): the target the sweep ran with (sweep.json)


# ---------------------------------------------------------------------------------------------
# Seeds

def parse_confirm_seeds(text: Optional[str]) -> list:
    """``--confirm-seeds`` text: None -> the default seeds, ``"none"`` -> [], else a comma list of integers."""
    if text is None:
        return list(CONFIRM_SEEDS)
    if text.strip().lower() == "none":
        return []
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"--confirm-seeds {text!r} must be a comma list of integers or 'none'") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--confirm-seeds {text!r} repeats a seed")
    return seeds


def check_confirm_seeds(tuning: list, confirm: list) -> None:
    """ValueError when a confirmation seed is also a tuning seed: a configuration selected on a seed can't
    be confirmed on it."""
    overlap = sorted(set(tuning) & set(confirm))
    if overlap:
        raise ValueError(f"--confirm-seeds {confirm} overlap the tuning seeds {sorted(tuning)} at {overlap}: "
                         "confirmation needs seeds the selection never saw")


# ---------------------------------------------------------------------------------------------
# Search edges and extension

def hyperparameter(name: str, key: str):
    return OPTIMIZERS[name].hyperparameters[key.split(".", 1)[1]]


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def search_axes(spec: Spec, name: str) -> dict:
    """``{key: sorted values}``: optimizer ``name``'s numeric knobs searched over two or more values, the axes
    whose edges are checked. A one-value axis is fixed by choice; a string knob has no edges."""
    out = {}
    for key, values in spec.search.get(name, {}).items():
        if is_hyperparameter(key) and uses(name, key) and all(map(is_number, values)) and len(set(values)) > 1:
            out[key] = sorted(set(values))
    return out


def spec_rows(rows: list[dict], spec: Spec) -> list[dict]:
    """The rows that are runs of ``spec`` (a sweep directory may hold runs of other invocations)."""
    hashes = {run.hash for run in expand(spec)}
    return [r for r in rows if r["hash"] in hashes]


@dataclass
class Optimum:
    """An optimizer's best point and where it sits in its search: ``edges`` (``stats.Edge`` per checked
    axis) and, for each side where it is on an edge, the ``stats.Extension`` outward (no values: blocked)."""
    name: str
    point: dict
    edges: dict
    extensions: dict = field(default_factory=dict)  # knob -> {side: Extension}

    @property
    def interior(self) -> bool:
        return not self.extensions

    def extendable(self) -> dict:
        """``{knob: [new values]}`` over the sides that can be extended."""
        out = {}
        for knob, sides in self.extensions.items():
            values = [v for ext in sides.values() for v in ext.values]
            if values:
                out[knob] = values
        return out

    def blocked(self) -> list:
        """``(knob, side, note)`` for each edge that can't be extended (a bound, or no step to extend by)."""
        return [(knob, side, ext.note) for knob, sides in self.extensions.items() for side, ext in sides.items()
                if not ext.values]

    def describe(self) -> str:
        """``"interior"`` or e.g. ``"lr on its high edge (0.01); wd on its low edge (0), at its bound"``."""
        if self.interior:
            return "interior" if self.edges else "interior (no axis searched)"
        parts = []
        for knob, sides in self.extensions.items():
            for side, ext in sides.items():
                where = f"{short_name(knob)} on its {side} edge ({self.point[knob]:g})"
                parts.append(where + (f": next {', '.join(f'{v:g}' for v in ext.values)}" if ext.values
                                      else f": can't extend ({ext.note})"))
        return "; ".join(parts)


def find_optima(spec: Spec, rows: list[dict]) -> dict:
    """``{optimizer: Optimum}`` over the runs of ``spec`` among ``rows``."""
    points = results.summarize(spec_rows(rows, spec))
    optima = {}
    for name, point in results.best_points(points).items():
        axes = search_axes(spec, name)
        bounds = {k: hyperparameter(name, k).limits for k in axes}
        edges = stats.search_edges(axes, point, bounds)
        extensions = {}
        for knob, edge in edges.items():
            spacing = "geometric" if hyperparameter(name, knob).log else "arithmetic"
            sides = {}
            for side in [s for s, at in (("low", edge.low), ("high", edge.high)) if at]:
                try:
                    sides[side] = stats.extend_axis(edge.values, side, 1, bounds[knob], spacing=spacing)
                except ValueError as error:  # e.g. a log axis that can't step past a value <= 0
                    sides[side] = stats.Extension((), spacing, True, str(error))
            if sides:
                extensions[knob] = sides
        optima[name] = Optimum(name, point, edges, extensions)
    return optima


def extend_spec(spec: Spec, optima: dict) -> tuple:
    """``(spec with each optimizer's extendable axes grown by their next values, {name: {knob: added}})``.
    The grid stays a grid: a value added to one axis runs with every value of the others."""
    search = {name: dict(axes) for name, axes in spec.search.items()}
    added = {}
    for name, optimum in optima.items():
        for knob, values in optimum.extendable().items():
            search.setdefault(name, {})[knob] = sorted(set(search[name][knob]) | set(values))
            added.setdefault(name, {})[knob] = values
    return dataclasses.replace(spec, search=search), added


def annotate(points: list[dict], optima: dict) -> list[dict]:
    """``points`` with ``best`` (each optimizer's best point) and ``search_edge`` (for a best point:
    ``Optimum.describe``; empty for the others)."""
    keys = {results.point_key(o.point): o for o in optima.values()}
    out = []
    for p in points:
        optimum = keys.get(results.point_key(p))
        out.append({**p, "best": optimum is not None, "search_edge": optimum.describe() if optimum else None})
    return out


# ---------------------------------------------------------------------------------------------
# Confirmation

def confirm_spec(spec: Spec, best: dict, seeds: list) -> Spec:
    """Each optimizer's best configuration (``{name: point}``) on ``seeds``: the tuning spec's base, the
    point's optimizer knobs and crossed values, nothing else varied."""
    search = {}
    for name, point in best.items():
        keys = [k for k in results.CONFIG_KEYS if k.startswith("optim.") and k != "optim.name"] + list(spec.cross)
        search[name] = {k: [point[k]] for k in keys if point.get(k) is not None}
    return Spec("optimizers", dict(spec.base), list(best), search, list(seeds))


# ---------------------------------------------------------------------------------------------
# The verdict

@dataclass
class Verdict:
    target: object
    tuning_seeds: list
    confirm_seeds: list
    rows: list       # one per optimizer (verdict.csv)
    pairs: list      # one per pair of optimizers and unit (verdict_pairs.csv)
    optima: dict     # name -> Optimum (tuning)
    headline: dict   # name -> the run rows behind its headline statistics (confirmation runs when confirmed)
    tuning: list     # the tuning runs of the spec
    notes: list


def search_text(spec: Spec, name: str, added: dict) -> str:
    """``"lr 3e-4, 1e-3, 3e-3, 1e-2 (+1e-2 by extension); wd 0.1, 0.3, 1; b1 0.9 (fixed)"``."""
    parts = []
    for key, values in spec.search.get(name, {}).items():
        if not uses(name, key):
            continue
        numeric = all(map(is_number, values))
        shown = ", ".join(f"{v:g}" if numeric else str(v) for v in (sorted(set(values)) if numeric else values))
        extra = added.get(name, {}).get(key)
        note = f" (+{', '.join(f'{v:g}' for v in extra)} by extension)" if extra else \
            " (fixed)" if len(set(values)) == 1 else ""
        parts.append(f"{short_name(key)} {shown}{note}")
    return "; ".join(parts)


def config_text(point: dict, spec: Spec, name: str) -> str:
    return ", ".join(f"{short_name(k)} {point[k]:g}" if is_number(point[k]) else f"{short_name(k)} {point[k]}"
                     for k in spec.search.get(name, {}) if uses(name, k) and point.get(k) is not None)


def times_by_seed(rows: list[dict], unit: str) -> dict:
    return {r["seed"]: r[f"{unit}_to_target"] if r["reached"] else None for r in rows}


def make_verdict(spec: Spec, rows: list[dict], confirm_rows: list[dict], meta: dict, target) -> Verdict:
    """The verdict over the tuning ``rows`` (runs of ``spec``) and the confirmation runs ``confirm_rows``."""
    tuning = spec_rows(rows, spec)
    optima = find_optima(spec, tuning)
    points = results.summarize(tuning)
    groups = results.group_points(tuning)
    confirm_groups = results.group_points([r for r in confirm_rows if r["seed"] not in spec.seeds])
    added = meta.get("extended", {})
    notes, out, headline = [], [], {}
    for name, optimum in optima.items():
        key = results.point_key(optimum.point)
        confirmed = confirm_groups.get(key, [])
        runs = confirmed or groups[key]
        headline[name] = runs
        if not confirmed:
            notes.append(f"{name}: NOT confirmed: its statistics are over the tuning seeds it was selected on "
                         "(optimistic)")
        mine = [p for p in points if p["optim.name"] == name]
        by_point = [[r["steps_to_target"] if r["reached"] else None for r in groups[results.point_key(p)]]
                    for p in mine]
        sensitivity = stats.tuning_sensitivity(by_point)
        tuned = optimum.point
        row = {"optimizer": name, "optim.name": name, "confirmed": bool(confirmed),
               "seeds": " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
               "configuration": config_text(tuned, spec, name), "search": search_text(spec, name, added),
               "interior": optimum.interior, "optimum": optimum.describe(),
               "tuning_reached": tuned["reached"], "tuning_runs": tuned["runs"],
               **results.censored_statistics(runs), "target": tuned["target"],
               "points_searched": sensitivity.n, "points_reaching": sensitivity.k,
               "expected_trials": sensitivity.expected_trials,
               **{k: tuned.get(k) for k in results.CONFIG_KEYS if k.startswith("optim.") and k != "optim.name"}}
        out.append(row)
    early = sum(bool(r.get("censored_early")) for r in tuning + confirm_rows)
    if early:
        notes.append(f"{early} run(s) stopped at their early stop, below this target, and are censored where they "
                     "stopped: they can't say when they would have reached it (rerun without --early-stop)")
    pairs = []
    for a, b in itertools.combinations(sorted(headline), 2):
        for unit in ("steps", "seconds"):
            ta, tb = times_by_seed(headline[a], unit), times_by_seed(headline[b], unit)
            if not set(ta) & set(tb):
                continue
            c = stats.paired_comparison(ta, tb)
            pairs.append({"a": a, "b": b, "unit": unit, "seeds": c.n, "a_first": c.wins, "b_first": c.losses,
                          "ties": c.ties, "fraction": c.fraction, "lower": c.lower, "upper": c.upper,
                          "confirmed": all(r["confirmed"] for r in out if r["optimizer"] in (a, b))})
    for row in out:
        for p in pairs:
            if p["unit"] == "steps" and row["optimizer"] in (p["a"], p["b"]):
                mine = p["a"] == row["optimizer"]
                other = p["b"] if mine else p["a"]
                f, lo, hi = (p["fraction"], p["lower"], p["upper"]) if mine else \
                    (1 - p["fraction"], 1 - p["upper"], 1 - p["lower"])
                row[f"first_vs_{other}"] = f"{f:.2f} [{lo:.2f}, {hi:.2f}]"
    return Verdict(target, list(spec.seeds), sorted({r["seed"] for rs in headline.values() for r in rs
                                                      if r["seed"] not in spec.seeds}),
                   out, pairs, optima, headline, tuning, notes)


def read_meta(out: Path) -> dict:
    path = Path(out) / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {}


def compute(out: Path, target=KEEP) -> Optional[Verdict]:
    """The verdict of optimizer sweep ``out`` from its run directories and ``sweep.json`` (None for another
    kind of sweep); ``target`` defaults to the one the sweep ran with."""
    out = Path(out)
    meta = read_meta(out)
    target = meta.get("target") if target is KEEP else target
    if meta.get("kind", "optimizers") != "optimizers":
        return None
    spec = Spec(**meta["spec"]) if "spec" in meta else spec_from_rows(results.collect(out, target))
    if spec is None:
        return None
    confirm_rows, cdir = [], out / CONFIRM_DIR
    if (cdir / "sweep.json").exists():
        confirm_rows = spec_rows(results.collect(cdir, target), Spec(**read_meta(cdir)["spec"]))
    return make_verdict(spec, results.collect(out, target), confirm_rows, meta, target)


def spec_from_rows(rows: list[dict]) -> Optional[Spec]:
    """The optimizer sweep ``rows`` are the runs of, for a directory without ``sweep.json``: the keys that
    are the same in every run as the base, each optimizer's knobs over the values it ran (None: no rows)."""
    if not rows:
        return None
    knob = [k for k in results.CONFIG_KEYS if k.startswith("optim.") and k != "optim.name"]
    other = [k for k in results.CONFIG_KEYS if k not in knob and k not in ("seed", "optim.name")]
    base = {k: rows[0][k] for k in other if len({repr(r.get(k)) for r in rows}) == 1}
    cross = {k: sorted({r[k] for r in rows}, key=repr) for k in other if k not in base}
    names = sorted({r["optim.name"] for r in rows})
    search = {n: {k: sorted({r[k] for r in rows if r["optim.name"] == n}, key=repr) for k in knob
                  if any(r["optim.name"] == n and r.get(k) is not None for r in rows)} for n in names}
    return Spec("optimizers", base, names, search, sorted({r["seed"] for r in rows}), cross)


def fmt(x) -> str:
    return "" if x is None else stats.format_number(x) if is_number(x) and math.isfinite(x) else str(x)


def markdown(v: Verdict) -> str:
    """``verdict.md``: the headline table, the paired comparisons and how they were computed."""
    confirmed = all(r["confirmed"] for r in v.rows)
    seeds = (f"confirmation seeds {v.confirm_seeds} only (selected on tuning seeds {v.tuning_seeds})" if confirmed
             else f"NOT all confirmed: see the notes (tuning seeds {v.tuning_seeds})")
    target = results.target_text(v.rows[0]["target"]) if v.rows else ""
    lines = [f"# Verdict: time to {target}", "",
             f"Statistics over {seeds}. Median: Kaplan-Meier, with its 95% interval (Brookmeyer-Crowley); "
             "'> N' where the data cannot bound it within the budget N.", "",
             "| optimizer | best configuration | search (as run) | optimum | reached | epochs | steps | seconds | "
             "searched points reaching (tuning) | expected random trials |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in v.rows:
        lines.append(f"| {r['optimizer']}{'' if r['confirmed'] else ' (not confirmed)'} | {r['configuration']} | "
                     f"{r['search']} | {r['optimum']} | {r['reached']} / {r['runs']} | {r['epochs_km']} | "
                     f"{r['steps_km']} | {r['seconds_km'] or 'n/a'} | {r['points_reaching']} / "
                     f"{r['points_searched']} | {fmt(r['expected_trials'])} |")
    if v.pairs:
        lines += ["", "## Paired comparison, seed by seed", "",
                  "A seed counts for A when A reaches the target first (a run that reaches beats one that does "
                  "not); ties count half. Interval: 95% percentile bootstrap over the seeds.", "",
                  "| A vs B | time | seeds | A first | B first | ties | fraction A first [95%] |",
                  "|---|---|---|---|---|---|---|"]
        for p in v.pairs:
            lines.append(f"| {p['a']} vs {p['b']} | {p['unit']} | {p['seeds']} | {p['a_first']} | {p['b_first']} | "
                         f"{p['ties']} | {p['fraction']:.2f} [{p['lower']:.2f}, {p['upper']:.2f}] |")
    if v.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in v.notes]
    return "\n".join(lines) + "\n"


def write(out: Path, v: Verdict) -> None:
    """``verdict.csv``, ``verdict_pairs.csv`` and ``verdict.md`` in ``out``; ``points.csv`` gains the edge columns."""
    out = Path(out)
    results.write_csv(out / "verdict.csv", v.rows)
    results.write_csv(out / "verdict_pairs.csv", v.pairs)
    (out / "verdict.md").write_text(markdown(v))


def rebuild(out: Path, target=KEEP) -> Optional[Verdict]:
    """Rebuild ``out``'s tables (and ``out/confirm``'s) and, for an optimizer sweep, its verdict files."""
    out = Path(out)
    v = compute(out, target)
    if v is None:
        results.rebuild_table(out, None if target is KEEP else target)
        return None
    rows = results.collect(out, v.target)
    results.write_tables(out, rows, annotate=lambda points: annotate(points, v.optima))
    if (out / CONFIRM_DIR / "runs").is_dir():
        results.rebuild_table(out / CONFIRM_DIR, v.target)
    write(out, v)
    return v


def print_verdict(v: Verdict) -> None:
    print(markdown(v).rstrip())


# ---------------------------------------------------------------------------------------------
# The three phases

def plan_text(spec: Spec, extend: bool, rounds: int, confirm: list) -> str:
    """What extension and confirmation would add to the tuning runs ``--dry-run`` lists."""
    lines = []
    if extend:
        for name in spec.optimizers:
            axes = search_axes(spec, name)
            if not axes:
                continue
            grid = math.prod(len(v) for k, v in spec.search[name].items() if uses(name, k))
            each = ", ".join(f"{short_name(k)} {grid // len(v) * len(spec.seeds)}" for k, v in axes.items())
            lines.append(f"  {name}: a value added to an axis its best is on the edge of adds runs: {each}")
        lines.insert(0, f"extension (--extend): up to {rounds} rounds, each run only for optimizers whose best "
                        "is on an edge, one new value per edge side:")
    if confirm:
        lines.append(f"confirmation: {len(spec.optimizers)} optimizers x {len(confirm)} seeds {confirm} = "
                     f"{len(spec.optimizers) * len(confirm)} runs after tuning")
    return "\n".join(lines)


def run_optimizer_sweep(spec: Spec, out: Path, executor, dry_run: bool = False, argv=None, target=None,
                        extend: bool = False, rounds: int = EXTEND_ROUNDS, confirm=None) -> int:
    """Tuning, extension and confirmation (see the module docstring); then the verdict is written and
    printed. Returns the exit status (1 when a run failed: nothing after that phase runs)."""
    out = Path(out)
    confirm = list(CONFIRM_SEEDS if confirm is None else confirm)
    check_confirm_seeds(spec.seeds, confirm)
    if rounds < 0:
        raise ValueError(f"--extend-rounds={rounds} must be >= 0")
    meta = {"confirm_seeds": confirm, "extend_rounds": rounds if extend else 0, "extended": {}}
    if dry_run:
        status = run_sweep(spec, out, executor, True, argv, target)
        text = plan_text(spec, extend, rounds, confirm)
        if text:
            print(text)
        return status
    if run_sweep(spec, out, executor, argv=argv, target=target, meta=meta):
        return 1
    done = 0
    while True:
        optima = find_optima(spec, results.collect(out, target))
        for optimum in optima.values():
            print(f"{optimum.name} best point: {optimum.describe()}")
        grow = {n: o.extendable() for n, o in optima.items() if o.extendable()}
        blocked = [f"{n} {short_name(k)} ({side}): {note}" for n, o in optima.items() for k, side, note in o.blocked()]
        if blocked:
            print("stopped by a bound: " + "; ".join(blocked))
        if not grow:
            break
        if not extend:
            print("a best point is on the edge of its search: --extend adds the next values and runs them")
            break
        if done == rounds:
            print(f"extension stopped after {rounds} round(s) (--extend-rounds): "
                  f"{', '.join(grow)} still on an edge")
            break
        done += 1
        spec, added = extend_spec(spec, optima)
        for name, knobs in added.items():
            for knob, values in knobs.items():
                meta["extended"].setdefault(name, {}).setdefault(knob, []).extend(values)
        print(f"extension round {done}: " + "; ".join(f"{n} {short_name(k)} + {', '.join(f'{v:g}' for v in vs)}"
                                                     for n, ks in added.items() for k, vs in ks.items()))
        if run_sweep(spec, out, executor, argv=argv, target=target, meta=meta):
            return 1
    if confirm:
        cspec = confirm_spec(spec, {n: o.point for n, o in optima.items()}, confirm)
        print(f"confirmation: each optimizer's best configuration on seeds {confirm}", flush=True)
        if run_sweep(cspec, out / CONFIRM_DIR, executor, argv=argv, target=target,
                     meta={"tuning": str(out), "tuning_seeds": list(spec.seeds)}):
            return 1
    v = rebuild(out, target)
    print_verdict(v)
    print(f"verdict: {out / 'verdict.md'}, {out / 'verdict.csv'}, {out / 'verdict_pairs.csv'}")
    return 0
