"""A run's configuration: ``Config`` composes each module's config; one override mechanism serves the
command line and the sweeps; one table names every knob (flag, config key, short name, plot label).

    cfg = override(Config(), {"optim.name": "quad", "model.dim": 64})   # dotted keys, type-checked
    parse_dotted(["--optim.lr=3e-3", "--model.heads", "4"])              # {"optim.lr": "3e-3", ...}
"""
import argparse
import ast
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from data import DataConfig
from models import ModelConfig
from optimizers import OptimConfig


DEFAULT_EPOCHS = 150


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 512
    epochs: Optional[int] = None  # the budget in epochs (DEFAULT_EPOCHS when no budget is given) ...
    steps: Optional[int] = None  # ... or in optimizer steps: one of the two
    eval_every: Optional[int] = None  # optimizer steps between evaluations (None: after every epoch)
    early_stop_val_acc: Optional[float] = None  # stop once validation accuracy reaches this
    cpu: bool = False  # force MLX's CPU device (Linux wheels have no other)

    def __post_init__(self):
        for key in ("batch_size", "epochs", "steps", "eval_every"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"train.{key}={value} must be a positive integer")
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"train.epochs={self.epochs} and train.steps={self.steps}: give one budget, not both")
        if self.early_stop_val_acc is not None and not 0 < self.early_stop_val_acc <= 1:
            raise ValueError(f"train.early_stop_val_acc={self.early_stop_val_acc} must be in (0, 1]")

    def resolved(self) -> "TrainConfig":
        """The budget made explicit: ``DEFAULT_EPOCHS`` epochs when neither budget is set."""
        unset = self.epochs is None and self.steps is None
        return dataclasses.replace(self, epochs=DEFAULT_EPOCHS) if unset else self


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 42

    def resolved(self) -> "Config":
        """The config with the optimizer's defaults filled in: what a run really used."""
        return dataclasses.replace(self, optim=self.optim.resolved(), train=self.train.resolved())


# The papers' settings, by name: overrides through the same mechanism as every flag (a flag beside one wins).
# Power et al. (2022), "Grokking: generalization beyond overfitting on small algorithmic datasets": a 2-layer,
# width-128, 4-head transformer, AdamW (lr 1e-3, betas 0.9 / 0.98, 10 warm-up steps), batch min(512, train/2),
# a budget of 10^6 steps; late grokking without weight decay, faster with weight decay 1.
_POWER_2022 = {"data.op": "/", "data.p": 97, "data.train_fraction": 0.5, "model.dim": 128, "model.depth": 2,
               "model.heads": 4, "model.dropout": 0.0, "optim.name": "adamw", "optim.lr": 1e-3,
               "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.warmup_steps": 10, "train.batch_size": 512,
               "train.steps": 10 ** 6, "train.eval_every": 1000}
PRESETS = {
    "power2022-late": {**_POWER_2022, "optim.weight_decay": 0.0},
    "power2022-wd": {**_POWER_2022, "optim.weight_decay": 1.0},
}


BUDGET_KEYS = ("train.epochs", "train.steps")


def merge_overrides(base: dict, overrides: dict) -> dict:
    """``base | overrides``, where a budget in ``overrides`` (epochs or steps) replaces either budget in ``base``."""
    merged = dict(base)
    if any(k in overrides for k in BUDGET_KEYS):
        for key in BUDGET_KEYS:
            merged.pop(key, None)
    return {**merged, **overrides}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ---------------------------------------------------------------------------------------------
# The knobs: every config field, named once.

@dataclass(frozen=True)
class Knob:
    key: str                  # config key
    flag: Optional[str]       # command-line flag (the reference repository's spelling), or None
    short: str                # in run directory names
    label: str                # on figures
    aliases: tuple = ()       # further spellings of the flag


KNOBS = (
    Knob("data.p", "--p", "p", "p"),
    Knob("data.op", "--op", "op", "operation"),
    Knob("data.train_fraction", "--train-fraction", "tf", "train fraction"),
    Knob("model.dim", "--dim", "dim", "model width (dim)"),
    Knob("model.depth", "--depth", "depth", "depth (blocks)"),
    Knob("model.heads", "--heads", "heads", "attention heads"),
    Knob("model.dropout", "--dropout", "drop", "dropout"),
    Knob("model.mlp_ratio", None, "mlp", "MLP ratio"),
    Knob("optim.name", "--optimizer", "", "optimizer"),
    Knob("optim.lr", "--lr", "lr", "learning rate"),
    Knob("optim.weight_decay", "--weight-decay", "wd", "weight decay"),
    Knob("optim.beta1", "--beta1", "b1", "beta1"),
    Knob("optim.beta2", "--beta2", "b2", "beta2"),
    Knob("optim.momentum", "--momentum", "mom", "momentum"),
    Knob("optim.preconditioner_lr", "--preconditioner-lr", "plr", "preconditioner learning rate"),
    Knob("optim.preconditioner", "--preconditioner", "prec", "preconditioner"),
    Knob("optim.adam_lr", "--adam-lr", "alr", "AdamW learning rate (embedding, read-out, norms)"),
    Knob("optim.warmup_steps", "--warmup", "warmup", "warm-up steps"),
    Knob("train.batch_size", "--batch-size", "bs", "batch size", ("-b", "--batch_size")),
    Knob("train.epochs", "--epochs", "ep", "epoch budget", ("-e",)),
    Knob("train.steps", "--steps", "st", "step budget"),
    Knob("train.eval_every", "--eval-every", "ev", "steps between evaluations"),
    Knob("train.early_stop_val_acc", "--early-stop", "stop", "early stop (validation accuracy)"),
    Knob("train.cpu", "--cpu", "cpu", "CPU device"),
    Knob("seed", "--seed", "s", "seed"),
)
KNOB = {k.key: k for k in KNOBS}


def short_name(key: str) -> str:
    return KNOB[key].short if key in KNOB else key.split(".")[-1]


def label(key: str) -> str:
    return KNOB[key].label if key in KNOB else key


def field_type(key: str):
    """The type a config key holds (``Optional[X]`` -> ``X``)."""
    cfg, *path, last = [Config(), *key.split(".")]
    for part in path:
        cfg = getattr(cfg, part)
    annotation = {f.name: f.type for f in dataclasses.fields(cfg)}[last]
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    return options[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation


# ---------------------------------------------------------------------------------------------
# One override mechanism: dotted keys, type-checked, unknown keys rejected.

def _check_type(key: str, value, annotation):
    """Return ``value`` converted to ``annotation`` (int -> float allowed), or raise ValueError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} must be of type {annotation.__name__}")
    return value


def override(cfg, overrides: dict, prefix: str = ""):
    """A copy of the (nested, frozen) dataclass ``cfg`` with dotted keys such as ``optim.lr`` replaced.

    Values are type-checked against the fields; unknown keys raise ValueError listing the known ones.
    Every config's ``__post_init__`` validates the result.
    """
    groups: dict[str, dict] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        groups.setdefault(head, {})[rest] = value
    known = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for head, sub in groups.items():
        if head not in known:
            raise ValueError(f"unknown config key {prefix + head!r} (known: {', '.join(prefix + k for k in known)})")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            if "" in sub:
                raise ValueError(f"config key {prefix + head!r} is a section; set one of its fields, "
                                 f"e.g. {prefix + head}.<field>")
            changes[head] = override(current, sub, f"{prefix}{head}.")
        elif set(sub) != {""}:
            raise ValueError(f"unknown config key {prefix + head + '.' + next(k for k in sub if k)!r} "
                             f"({prefix + head} is not a section)")
        else:
            changes[head] = _check_type(prefix + head, sub[""], known[head].type)
    return dataclasses.replace(cfg, **changes)


def flatten(cfg) -> dict:
    """``{dotted_key: value}`` for every leaf field of a nested config."""
    return flatten_dict(dataclasses.asdict(cfg))


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """``{dotted_key: value}`` for every leaf of a nested dict (e.g. a ``config.json``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_hash(cfg: Config, length: int = 8) -> str:
    """Short hash of the full resolved config: the identity of a run."""
    text = json.dumps(dataclasses.asdict(cfg.resolved()), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def config_from_dict(d: dict) -> Config:
    """Inverse of ``dataclasses.asdict`` for ``Config`` (reads ``config.json``)."""
    return override(Config(), flatten_dict(d))


# ---------------------------------------------------------------------------------------------
# The command line's side of it, shared by ``main.py`` and ``python -m sweeps``.

class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are ValueErrors, printed by the caller as one line."""

    def error(self, message):
        raise ValueError(message)


def check_out_dir(path, flag: str = "--out") -> None:
    """ValueError when ``path`` exists and is not a directory."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")


def parse_value(text: str):
    """A command-line value as a Python literal when it is one (``3e-3``, ``None``, ``True``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_dotted(tokens: list) -> dict:
    """``{key: text}`` from ``--section.field=value`` or ``--section.field value`` tokens (and ``--seed``);
    ValueError for anything else."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token:
            raise ValueError(f"unrecognized argument {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"{token} needs a value")
            value, i = tokens[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def add_knob_flags(parser: argparse.ArgumentParser, skip=(), renamed=None, help_suffix: str = "") -> None:
    """One flag per knob of ``KNOBS`` that has one (``dest`` = its config key, values kept as text;
    a bool knob is a switch); ``renamed`` maps a key to other spellings replacing the table's."""
    for knob in KNOBS:
        if knob.flag is None or knob.key in skip:
            continue
        flags = (renamed or {}).get(knob.key) or (knob.flag, *knob.aliases)
        if field_type(knob.key) is bool:
            parser.add_argument(*flags, dest=knob.key, action="store_const", const="True", default=None,
                                help=f"sets {knob.key}")
        else:
            parser.add_argument(*flags, dest=knob.key, default=None, metavar=knob.key.split(".")[-1].upper(),
                                help=f"{knob.label} ({knob.key}){help_suffix}")
