"""A sweep as data, and its expansion into runs: ``Spec`` -> grids -> validated, named ``Run``s.

A run is identified by the hash of its full resolved config; its directory name adds the swept values
for people (``adamw_lr0.003_wd0.3_s0-1a2b3c4d``).
"""
import dataclasses
import itertools
import re
from dataclasses import dataclass, field

from config import Config, config_hash, flatten, override, short_name
from optimizers import KNOB_FIELDS, OPTIMIZERS

HASH_LEN = 8
OP_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


@dataclass
class Spec:
    """A sweep as data.

    Each optimizer contributes grids: ``{"optim.name": [name]}``, its own axes ``search[name]`` (knobs it
    lacks never appear; a knob left out takes its default), the ``cross`` axes, and either nothing more (a
    full grid) or, for each knob of ``vary``, that knob's values with the other knobs at ``center`` (one at
    a time). Every point runs once per seed as ``override(Config(), base | point | {"seed": seed})``.
    """
    kind: str  # "optimizers" or "architecture": chooses the figures
    base: dict
    optimizers: list
    search: dict  # optimizer name -> {optim key: values}
    seeds: list
    cross: dict = field(default_factory=dict)
    vary: dict = field(default_factory=dict)
    center: dict = field(default_factory=dict)


def default_spec(kind: str) -> Spec:
    """The built-in spec of ``kind`` ("optimizers" or "architecture") over every registered optimizer."""
    from sweeps import architecture, optimizers
    if kind == "optimizers":
        return Spec(kind, dict(optimizers.BASE), list(OPTIMIZERS),
                    {name: entry.search_space() for name, entry in OPTIMIZERS.items()}, list(optimizers.SEEDS))
    if kind == "architecture":
        return Spec(kind, dict(architecture.BASE), list(OPTIMIZERS), {name: {} for name in OPTIMIZERS},
                    list(architecture.SEEDS), vary={k: list(v) for k, v in architecture.AXES.items()},
                    center=dict(architecture.CENTER))
    raise ValueError(f"unknown sweep {kind!r}; choose from ['architecture', 'optimizers']")


def is_hyperparameter(key: str) -> bool:
    return key.startswith("optim.") and key[len("optim."):] in KNOB_FIELDS


def uses(name: str, key: str) -> bool:
    """Whether optimizer ``name`` uses config key ``key`` (keys other than optimizer knobs: every optimizer)."""
    return not is_hyperparameter(key) or key[len("optim."):] in OPTIMIZERS[name].hyperparameters


def apply_axes(spec: Spec, axes: dict) -> Spec:
    """A copy of ``spec`` where each ``key: [values]`` of ``axes`` (command-line flags) replaces that axis.

    ``optim.name`` and ``seed`` set the optimizers and seeds; a knob of ``vary`` gets new values (its
    center stays when the list holds it, else becomes the first value); an optimizer knob replaces that
    axis of every optimizer that has it (an error when none has); a budget key replaces the budget; any
    other key is set for every run when given one value and becomes an axis crossed with everything when
    given several.
    """
    spec = dataclasses.replace(spec, base=dict(spec.base), optimizers=list(spec.optimizers), seeds=list(spec.seeds),
                               search={k: dict(v) for k, v in spec.search.items()}, cross=dict(spec.cross),
                               vary=dict(spec.vary), center=dict(spec.center))
    for key, values in axes.items():
        if not list(values):
            raise ValueError(f"{key}: empty list of values")
    if "optim.name" in axes:
        spec.optimizers = list(axes["optim.name"])
        check_optimizers(spec.optimizers)
    for key, values in axes.items():
        values = list(values)
        if key == "optim.name":
            continue
        if key == "seed":
            spec.seeds = values
        elif key in spec.vary:
            spec.vary[key] = values
            if spec.center.get(key) not in values:
                spec.center[key] = values[0]
        elif is_hyperparameter(key):
            users = [n for n in spec.optimizers if uses(n, key)]
            if not users:
                knobs = "; ".join(f"{n}: {', '.join(OPTIMIZERS[n].hyperparameters)}" for n in spec.optimizers)
                raise ValueError(f"{key} is not a knob of {', '.join(spec.optimizers)} ({knobs})")
            for name in users:
                spec.search.setdefault(name, {})[key] = values
        elif len(values) == 1:
            spec.base[key] = values[0]
            spec.cross.pop(key, None)
        else:
            spec.cross[key] = values
            spec.base.pop(key, None)
    return spec


def check_optimizers(names: list) -> None:
    for name in names:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(OPTIMIZERS)}")


def check_spec(spec: Spec) -> None:
    """Raise ValueError naming the first empty, unregistered or mistyped part of ``spec``."""
    if not spec.optimizers:
        raise ValueError("no optimizers to sweep")
    check_optimizers(spec.optimizers)
    if not spec.seeds:
        raise ValueError("no seeds")
    for seed in spec.seeds:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed {seed!r} must be an integer")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(f"repeated seed in {spec.seeds}")
    axes = [spec.cross, spec.vary, *spec.search.values()]
    for key, values in itertools.chain.from_iterable(a.items() for a in axes):
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{key}: axis must be a non-empty list, got {values!r}")
    if set(spec.vary) != set(spec.center):
        raise ValueError(f"vary keys {sorted(spec.vary)} and center keys {sorted(spec.center)} differ")


def grids(spec: Spec) -> list[dict]:
    """The spec as a list of grids ``{key: [values]}``; every grid's product is run."""
    out = []
    for name in spec.optimizers:
        own = {k: v for k, v in spec.search.get(name, {}).items() if uses(name, k)}
        head = {"optim.name": [name], **own, **spec.cross}
        if not spec.vary:
            out.append(head)
        for knob, values in spec.vary.items():
            out.append({**head, **{k: values if k == knob else [spec.center[k]] for k in spec.vary}})
    return out


@dataclass(frozen=True)
class Run:
    name: str  # directory name: swept values, seed, hash
    hash: str
    config: Config  # resolved


def format_value(key: str, value) -> str:
    if key == "data.op":
        return OP_NAMES.get(value, str(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(cfg: Config, keys, digest: str) -> str:
    """``<optimizer>_<short><value>..._s<seed>-<hash>``, e.g. ``adamw_lr0.003_wd0.3_s0-1a2b3c4d``."""
    flat = flatten(cfg)
    name = flat["optim.name"]
    parts = [str(name)] + [short_name(k) + format_value(k, flat[k]) for k in keys if uses(name, k)]
    parts.append(f"s{cfg.seed}")
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "_".join(parts)) + "-" + digest


def swept_keys(gs: list[dict]) -> list:
    """Keys that take more than one value for some optimizer, in order of first appearance (a knob that only
    differs between optimizers, such as AdamW's and Lion's beta2, is not swept)."""
    values = {}
    for g in gs:
        for k, v in g.items():
            values.setdefault(k, {}).setdefault(g["optim.name"][0], set()).update(map(repr, v))
    return [k for k, per in values.items() if k != "optim.name" and any(len(v) > 1 for v in per.values())]


def expand(spec: Spec) -> list[Run]:
    """Every run of ``spec``, validated (ValueError on the first bad config), deduplicated, seeds outermost."""
    check_spec(spec)
    gs = grids(spec)
    keys = swept_keys(gs)
    runs, seen = [], set()
    for seed in spec.seeds:
        for g in gs:
            for combo in itertools.product(*g.values()):
                point = dict(zip(g, combo))
                try:
                    cfg = override(Config(), {**spec.base, **point, "seed": seed}).resolved()
                except ValueError as error:
                    where = ", ".join(f"{k}={v!r}" for k, v in point.items())
                    raise ValueError(f"{error} (in run {where}, seed={seed})") from None
                digest = config_hash(cfg, HASH_LEN)
                if digest not in seen:
                    seen.add(digest)
                    runs.append(Run(run_name(cfg, keys, digest), digest, cfg))
    if not runs:
        raise ValueError("the sweep has no runs")
    return runs
