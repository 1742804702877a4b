"""Optimizer registry: a name maps to a factory and to the knobs that optimizer has.

Each entry declares its hyperparameters under the names its users know (``Hyperparameter``): the
default, the values allowed (checked, one-line errors), the values a sweep tries by default (its
search space) and how far a search may be widened. ``OptimConfig`` holds the knobs of every entry;
those the chosen optimizer lacks must stay ``None`` (a sweep that set one would vary a knob that does
nothing), and those left ``None`` take the entry's defaults (``OptimConfig.resolved``).

Learning rates are not comparable across entries: each entry's ``lr_means`` says what its ``lr`` does.
"""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim


@dataclass(frozen=True)
class Hyperparameter:
    """One knob of one optimizer.

    ``low``/``high`` bound the valid values (``None``: unbounded), inclusive unless ``*_open``; a
    string knob lists its ``choices``. ``search`` is the default search space; ``limits`` is how far
    a search may be extended along this knob. ``log``: the knob is searched on a log scale.
    """
    default: object
    search: tuple
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    limits: tuple = (None, None)
    log: bool = True

    def allowed(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def is_valid(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


def rate(default: float, search: tuple, limits=(1e-5, 1.0)) -> Hyperparameter:
    """A learning rate or weight decay: a number >= 0, searched on a log scale."""
    return Hyperparameter(default, tuple(search), low=0.0, limits=limits)


def coefficient(default: float, search: tuple, limits=(0.5, 0.999)) -> Hyperparameter:
    """A momentum or EMA coefficient in [0, 1), searched linearly."""
    return Hyperparameter(default, tuple(search), low=0.0, high=1.0, high_open=True, limits=limits, log=False)


def choice(default: str, choices: tuple, search: Optional[tuple] = None) -> Hyperparameter:
    return Hyperparameter(default, tuple(search or (default,)), choices=tuple(choices), log=False)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    beta1: Optional[float] = None
    beta2: Optional[float] = None
    momentum: Optional[float] = None
    preconditioner_lr: Optional[float] = None
    preconditioner: Optional[str] = None
    adam_lr: Optional[float] = None
    warmup_steps: int = 10

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r} is not registered; choose from {sorted(OPTIMIZERS)}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        entry = OPTIMIZERS[self.name]
        for key in KNOB_FIELDS:
            value = getattr(self, key)
            if value is None:
                continue
            if key not in entry.hyperparameters:
                raise ValueError(f"optim.{key}={value!r} is not a knob of {self.name!r} "
                                 f"(its knobs: {', '.join(entry.hyperparameters)})")
            hyper = entry.hyperparameters[key]
            if not hyper.is_valid(value):
                raise ValueError(f"optim.{key}={value!r} must be {hyper.allowed()} for {self.name!r}")

    def resolved(self) -> "OptimConfig":
        """This config with every ``None`` knob of its optimizer set to the optimizer's default."""
        hyper = OPTIMIZERS[self.name].hyperparameters
        return dataclasses.replace(self, **{k: h.default for k, h in hyper.items() if getattr(self, k) is None})


# The knob fields of OptimConfig: every hyperparameter any entry may declare.
KNOB_FIELDS = tuple(f.name for f in dataclasses.fields(OptimConfig) if f.name not in ("name", "warmup_steps"))


@dataclass(frozen=True)
class OptimizerEntry:
    factory: Callable[[OptimConfig], optim.Optimizer]
    hyperparameters: dict  # knob name -> Hyperparameter
    lr_means: str          # what this optimizer's ``lr`` does, in words

    def search_space(self) -> dict:
        """``{"optim.<knob>": [values]}``: the values a sweep tries by default."""
        return {f"optim.{k}": list(h.search) for k, h in self.hyperparameters.items()}


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(name: str, lr_means: str, **hyperparameters: Hyperparameter):
    """Register ``factory(cfg: OptimConfig) -> Optimizer`` under ``name`` with its knobs."""
    unknown = set(hyperparameters) - set(KNOB_FIELDS)
    assert not unknown, f"{name}: no OptimConfig field for {unknown}"

    def wrap(factory):
        OPTIMIZERS[name] = OptimizerEntry(factory, hyperparameters, lr_means)
        return factory
    return wrap


def warmup_schedule(cfg: OptimConfig, lr: Optional[float] = None):
    """Linear warm-up from 0 to ``lr`` (default ``cfg.lr``) over ``warmup_steps`` steps, then constant."""
    lr = cfg.lr if lr is None else lr
    if cfg.warmup_steps == 0:
        return lr
    # mlx's linear_schedule clamps the step, so it stays at lr after the warm-up.
    return optim.linear_schedule(0.0, lr, cfg.warmup_steps)


def build_optimizer(cfg: OptimConfig) -> optim.Optimizer:
    """The optimizer ``cfg`` names, with its unset knobs at their defaults."""
    return OPTIMIZERS[cfg.name].factory(cfg.resolved())


@register("adamw", lr_means="the step of each coordinate, about lr per step (the update is normalised by "
                            "its running RMS); decoupled weight decay w -= lr * weight_decay * w",
          lr=rate(1e-3, (1e-3, 3e-3, 1e-2)), weight_decay=rate(1.0, (0.3, 1.0, 3.0), limits=(1e-4, 10.0)),
          beta1=coefficient(0.9, (0.9,)), beta2=coefficient(0.98, (0.98,)))
def adamw(cfg: OptimConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=warmup_schedule(cfg), betas=[cfg.beta1, cfg.beta2],
                       weight_decay=cfg.weight_decay)


from optimizers.quad import QUAD  # noqa: E402  (after the registry helpers; quad.py imports only mlx)


# Not named ``quad``: that would shadow the ``optimizers.quad`` module for ``import optimizers.quad``.
@register("quad", lr_means="the update is lr / 3 times the whitened momentum P m (QUAD's update_scale, "
                           "to match Adam's update norm); decoupled weight decay w -= lr * weight_decay * w",
          lr=rate(3e-3, (3e-3, 1e-2, 3e-2)), weight_decay=rate(0.3, (0.3, 1.0, 3.0), limits=(1e-4, 10.0)),
          momentum=coefficient(0.9, (0.9,)), preconditioner_lr=rate(1.0, (1.0,), limits=(0.01, 2.0)),
          preconditioner=choice("dense", ("dense", "diagonal")))
def quad_optimizer(cfg: OptimConfig) -> optim.Optimizer:
    # The reference's grokking settings: every side dense (max_size_dense=inf, max_skew_dense=1), or every
    # side diagonal (max_size_dense=0), and per-tensor gradient normalisation.
    max_size_dense = float("inf") if cfg.preconditioner == "dense" else 0.0
    return QUAD(learning_rate=warmup_schedule(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                preconditioner_lr=cfg.preconditioner_lr, max_size_dense=max_size_dense, max_skew_dense=1.0,
                normalize_grads=True)


class Muon(optim.Muon):
    """mlx's Muon with decoupled weight decay, ``w -= lr * weight_decay * w`` before the update, as Muon's authors
    apply it. (mlx's own adds ``weight_decay * w`` to the gradient, which the orthogonalisation then rescales
    with the rest: at 0.1 it stopped learning altogether on the default task.)"""

    def __init__(self, learning_rate, momentum: float, weight_decay: float):
        super().__init__(learning_rate, momentum=momentum, weight_decay=0.0, nesterov=True)
        self.decoupled_weight_decay = weight_decay

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        lr = self.learning_rate.astype(gradient.dtype)
        return super().apply_single(gradient, parameter * (1 - lr * self.decoupled_weight_decay), state)


def is_hidden_matrix(path: str, weight) -> bool:
    """The blocks' attention and MLP weights: the 2-D matrices Muon orthogonalises (not the embedding,
    the read-out or the norms)."""
    return path.startswith("blocks.") and weight.ndim == 2


@register("muon", lr_means="Muon (the blocks' 2-D weights): the momentum's orthogonalised direction (Newton-Schulz) "
                           "times lr, scaled by sqrt(max(1, rows/cols)), so every matrix moves by about lr in spectral "
                           "norm; decoupled weight decay w -= lr * weight_decay * w. AdamW (embedding, read-out, "
                           "norms) at adam_lr with decoupled decay w -= adam_lr * weight_decay * w",
          lr=rate(0.02, (0.01, 0.02, 0.05)), adam_lr=rate(1e-3, (1e-3,), limits=(1e-5, 1e-1)),
          momentum=coefficient(0.95, (0.95,)), weight_decay=rate(1.0, (0.3, 1.0, 3.0), limits=(1e-3, 30.0)))
def muon(cfg: OptimConfig) -> optim.Optimizer:
    # As Muon's authors prescribe: Muon for the hidden matrices, AdamW (betas 0.9 / 0.98) for everything else.
    return optim.MultiOptimizer(
        [Muon(warmup_schedule(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay),
         optim.AdamW(warmup_schedule(cfg, cfg.adam_lr), betas=[0.9, 0.98], weight_decay=cfg.weight_decay)],
        [is_hidden_matrix])


@register("lion", lr_means="every coordinate moves by exactly lr per step (the sign of an interpolated momentum), so "
                           "lr is about 3-10x below AdamW's; decoupled weight decay w -= lr * weight_decay * w",
          lr=rate(3e-4, (1e-4, 3e-4, 1e-3)), weight_decay=rate(3.0, (1.0, 3.0, 10.0), limits=(1e-3, 100.0)),
          beta1=coefficient(0.9, (0.9,)), beta2=coefficient(0.99, (0.99,)))
def lion(cfg: OptimConfig) -> optim.Optimizer:
    return optim.Lion(warmup_schedule(cfg), betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)


@register("sgd", lr_means="plain gradient steps: w -= lr * (Nesterov momentum of the gradient), not normalised, so "
                           "lr is orders of magnitude above the adaptive optimizers'; mlx's SGD adds weight_decay * w "
                           "to the gradient (L2, coupled)",
          lr=rate(0.3, (0.1, 0.3, 1.0), limits=(1e-4, 10.0)), weight_decay=rate(1e-3, (3e-4, 1e-3, 3e-3)),
          momentum=coefficient(0.9, (0.9,)))
def sgd(cfg: OptimConfig) -> optim.Optimizer:
    return optim.SGD(warmup_schedule(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
