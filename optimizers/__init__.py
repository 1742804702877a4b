"""Optimizer registry: a name maps to a factory built from one small config.

``OptimConfig`` fields left as ``None`` take the registered optimizer's own defaults, so
``--optimizer quad`` gets QUAD's grokking settings and ``--optimizer adamw`` AdamW's. A field
an optimizer does not use (AdamW's ``beta2`` for QUAD) must stay ``None``: a sweep that sets it
would otherwise vary a knob that does nothing.
"""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

from dataclasses import dataclass, replace
from typing import Callable, Optional

import mlx.optimizers as optim

HYPERPARAMETERS = ("lr", "weight_decay", "beta1", "beta2")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    beta1: Optional[float] = None
    beta2: Optional[float] = None
    warmup_steps: int = 10

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r} is not registered; choose from {sorted(OPTIMIZERS)}")
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ValueError(f"optim.{key}={value} must be >= 0")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"optim.{key}={value} must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        entry = OPTIMIZERS[self.name]
        unused = [k for k in HYPERPARAMETERS if k not in entry.defaults and getattr(self, k) is not None]
        if unused:
            raise ValueError(f"optim.{unused[0]}={getattr(self, unused[0])} is not used by {self.name!r} "
                             f"(it takes {', '.join(entry.defaults)})")

    def resolved(self) -> "OptimConfig":
        """This config with every ``None`` hyperparameter filled from the optimizer's defaults."""
        defaults = OPTIMIZERS[self.name].defaults
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class OptimizerEntry:
    factory: Callable[[OptimConfig], optim.Optimizer]
    defaults: dict  # the hyperparameters this optimizer uses, with their default values


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(name: str, **defaults):
    """Register ``factory(cfg: OptimConfig) -> Optimizer`` under ``name`` with its default hyperparameters."""
    assert set(defaults) <= set(HYPERPARAMETERS), defaults

    def wrap(factory):
        OPTIMIZERS[name] = OptimizerEntry(factory, defaults)
        return factory
    return wrap


def warmup_schedule(cfg: OptimConfig):
    """Linear warmup from 0 to ``cfg.lr`` over ``warmup_steps`` steps, then constant."""
    if cfg.warmup_steps == 0:
        return cfg.lr
    # mlx's linear_schedule clamps the step, so it stays at cfg.lr after the warmup.
    return optim.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)


def build_optimizer(cfg: OptimConfig) -> optim.Optimizer:
    """Build the optimizer named by ``cfg.name``, with ``None`` fields set to its defaults."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.name].factory(cfg.resolved())


@register("adamw", lr=1e-3, weight_decay=1.0, beta1=0.9, beta2=0.98)
def adamw(cfg: OptimConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=warmup_schedule(cfg), betas=[cfg.beta1, cfg.beta2],
                       weight_decay=cfg.weight_decay)


from optimizers.quad import QUAD  # noqa: E402  (after the registry helpers; quad.py imports only mlx)


# Not named ``quad``: that would shadow the ``optimizers.quad`` module for ``import optimizers.quad``.
@register("quad", lr=3e-3, weight_decay=0.3, beta1=0.9)
def quad_optimizer(cfg: OptimConfig) -> optim.Optimizer:
    return QUAD(learning_rate=warmup_schedule(cfg), momentum=cfg.beta1, weight_decay=cfg.weight_decay,
                preconditioner_lr=1.0, max_size_dense=float("inf"), max_skew_dense=1.0, normalize_grads=True)
