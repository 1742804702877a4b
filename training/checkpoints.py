"""Checkpoints (everything a killed run needs to continue exactly) and snapshots (the parameters through
training, for analysis), both in the run directory:

    checkpoints/step_000001230/   model.safetensors, optimizer.safetensors, loop.safetensors, checkpoint.json
    snapshots/step_000001230.safetensors   the model's parameters (metadata: epoch, step)

A checkpoint is written into a temporary directory and renamed into place, so a kill during a write
leaves the previous checkpoints as they were; ``checkpoint.json`` holds the SHA-256 of the other files,
so a truncated or corrupted checkpoint is recognised and the previous one used. The last ``KEEP`` stay.
"""
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from training import rundir

CHECKPOINTS, SNAPSHOTS = "checkpoints", "snapshots"
KEEP = 2
ARRAY_FILES = ("model.safetensors", "optimizer.safetensors", "loop.safetensors")
META = "checkpoint.json"


class CheckpointError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Interval:
    """How often something happens: every ``n`` epochs, every ``n`` optimizer steps, or at ``n``
    log-spaced steps over the budget (``"10"``, ``"500steps"``, ``"log:30"``; ``"off"``: never)."""
    unit: str  # "epochs", "steps" or "log"
    n: int

    @staticmethod
    def parse(text: str, flag: str) -> Optional["Interval"]:
        text = str(text).strip()
        if text in ("off", "0", "none", "None"):
            return None
        unit, number = ("log", text[4:]) if text.startswith("log:") else \
            ("steps", text[:-5]) if text.endswith("steps") else ("epochs", text)
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{flag}={text!r} must be N (epochs), Nsteps or log:N with N >= 1, or off")
        return Interval(unit, int(number))

    def steps(self, budget: int) -> np.ndarray:
        """The log-spaced steps in ``[1, budget]`` (unit "log")."""
        return np.unique(np.round(np.geomspace(1, budget, self.n)).astype(np.int64))

    def next_stop(self, step: int, budget: int) -> Optional[int]:
        """The next step after ``step`` at which this falls inside an epoch (None: only at epoch ends)."""
        if self.unit == "steps":
            return (step // self.n + 1) * self.n
        if self.unit == "log":
            later = self.steps(budget)
            later = later[later > step]
            return int(later[0]) if len(later) else None
        return None

    def due(self, step: int, epoch_end: bool, epochs_done: int, budget: int) -> bool:
        if self.unit == "epochs":
            return epoch_end and epochs_done % self.n == 0
        if self.unit == "steps":
            return step % self.n == 0
        return bool(np.isin(step, self.steps(budget)))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(d for d in root.glob("step_*") if d.is_dir()) if root.is_dir() else []


def save_checkpoint(run_dir: Path, step: int, parameters: dict, optimizer_state: dict, loop_arrays: dict,
                    meta: dict) -> Path:
    """Write a checkpoint of ``step`` atomically and keep the last ``KEEP``."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final, tmp = root / f"step_{step:09d}", root / f".partial-step_{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trees = (parameters, dict(tree_flatten(optimizer_state)), loop_arrays)
    for name, arrays in zip(ARRAY_FILES, trees):
        mx.save_safetensors(str(tmp / name), arrays)
    meta = {**meta, "step": step, "files": {name: sha256(tmp / name) for name in ARRAY_FILES}}
    rundir.write_json_atomic(tmp / META, meta)
    if final.exists():  # the same step again (the run's end after a periodic checkpoint): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_all(run_dir: Path) -> None:
    """Remove the run's checkpoints and snapshots (a run started afresh in the directory)."""
    for name in (CHECKPOINTS, SNAPSHOTS):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def mark_finished(checkpoint: Path) -> None:
    """Record in ``checkpoint`` that the run ended there (budget spent, early stop or divergence)."""
    meta = rundir.read_json(checkpoint / META)
    rundir.write_json_atomic(checkpoint / META, {**meta, "finished": True})


@dataclasses.dataclass
class Checkpoint:
    path: Path
    meta: dict
    parameters: dict
    optimizer_state: dict
    loop_arrays: dict


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; CheckpointError naming the file that is missing, truncated or corrupted."""
    path = Path(path)
    try:
        meta = rundir.read_json(path / META)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / META}: unreadable ({error.__class__.__name__})") from None
    arrays = []
    for name in ARRAY_FILES:
        file = path / name
        if not file.exists() or sha256(file) != meta.get("files", {}).get(name):
            raise CheckpointError(f"{file}: missing, truncated or corrupted (checksum differs)")
        arrays.append(mx.load(str(file)))
    parameters, optimizer_state, loop_arrays = arrays
    return Checkpoint(path, meta, parameters, tree_unflatten(list(optimizer_state.items())), loop_arrays)


def latest_checkpoint(run_dir: Path, warn=print) -> Optional[Checkpoint]:
    """The newest good checkpoint of the run, or None; each bad one passed over is reported through ``warn``."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            warn(f"warning: {error}; using the previous checkpoint")
    return None


def check_parameters(checkpoint: Checkpoint, model) -> None:
    """CheckpointError when the checkpoint's parameters are not the model's names and shapes."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    found = {k: v.shape for k, v in checkpoint.parameters.items()}
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            raise CheckpointError(f"{checkpoint.path}: parameter {key} has shape {found.get(key)} in the checkpoint, "
                                  f"{expected.get(key)} in the model (a checkpoint of another model shape)")


def save_snapshot(run_dir: Path, model, epoch, step: int) -> Path:
    """The model's parameters at ``step``, atomically."""
    root = Path(run_dir) / SNAPSHOTS
    root.mkdir(exist_ok=True)
    path = root / f"step_{step:09d}.safetensors"
    tmp = root / f".partial-{path.name}"
    mx.save_safetensors(str(tmp), dict(tree_flatten(model.parameters())),
                        metadata={"epoch": str(epoch), "step": str(step)})
    os.replace(tmp, path)
    return path
