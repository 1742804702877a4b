"""Checkpoints and exact resume: a run killed with SIGKILL at any point and resumed with ``main.py --resume``
writes the same metrics.jsonl and summary.json as the uninterrupted run; snapshots; bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import main
import models
from config import Config, override
from training import checkpoints, rundir
from training.checkpoints import Interval
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness" / "killed_run.py"
SMALL = {"data.p": 11, "data.op": "+", "model.dim": 16, "model.depth": 2, "model.dropout": 0.2,
         "train.batch_size": 16, "train.epochs": 8}  # 60 training rows: 4 steps per epoch
TIMING = ("elapsed_s", "wall_s", "ms_per_step", "ms_per_eval")


def untimed(obj):
    if isinstance(obj, list):
        return [untimed(r) for r in obj]
    return {k: v for k, v in obj.items() if k not in TIMING}


def results(run_dir: Path):
    return untimed(rundir.read_metrics(run_dir)), untimed(rundir.read_json(run_dir / rundir.SUMMARY))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference runs, per scenario: (overrides, checkpoint interval, run directory)."""
    made = {}

    def run(name: str, overrides: dict, every: str):
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            with mx.stream(mx.cpu):
                train(override(Config(), overrides), out, progress=False, checkpoint_every=Interval.parse(every, "x"))
            made[name] = (overrides, every, out)
        return made[name]
    return run


SCENARIOS = {
    "adamw": ({**SMALL, "optim.name": "adamw"}, "2"),
    "quad": ({**SMALL, "optim.name": "quad"}, "2"),
    # evaluations and checkpoints inside epochs, a step budget that ends mid-epoch
    "adamw-steps": ({**SMALL, "optim.name": "adamw", "train.epochs": None, "train.steps": 27,
                     "train.eval_every": 3}, "5steps"),
}
KILLS = {  # every safetensors write counts (3 per checkpoint): save:5 falls inside the second checkpoint
    "adamw": ["steps:6", "save:5", "summary"],
    "quad": ["steps:6", "save:8"],
    "adamw-steps": ["steps:9", "save:11"],
}


@pytest.mark.parametrize("scenario, point", [(s, p) for s, points in KILLS.items() for p in points])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path, scenario, point):
    overrides, every, reference = uninterrupted(scenario, *SCENARIOS[scenario])
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(HARNESS), json.dumps(overrides), str(out), point, every],
                            cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (out / rundir.SUMMARY).exists()
    resumed = subprocess.run([sys.executable, "main.py", "--resume", "--out", str(out), "--checkpoint-every", every,
                              "--no-plot"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert results(out) == results(reference)
    assert len(checkpoints.checkpoint_dirs(out)) <= checkpoints.KEEP
    assert not list((out / checkpoints.CHECKPOINTS).glob(".partial-*")) or point.startswith("save")


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path, capsys):
    overrides, every, reference = uninterrupted("adamw", *SCENARIOS["adamw"])
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / rundir.SUMMARY).unlink()
    newest = checkpoints.checkpoint_dirs(out)[-1]
    with open(newest / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    assert main.main(["--resume", "--out", str(out), "--checkpoint-every", every, "--no-plot"]) == 0
    assert f"{newest / 'optimizer.safetensors'}: missing, truncated or corrupted" in capsys.readouterr().out
    assert results(out) == results(reference)


def test_resume_rejects_a_changed_config_and_a_missing_checkpoint(uninterrupted, tmp_path, capsys):
    _, _, reference = uninterrupted("adamw", *SCENARIOS["adamw"])
    assert main.main(["--resume", "--out", str(reference), "--lr", "3e-3", "--dim", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.dim: 16 -> 32" in err and "optim.lr: 0.001 -> 0.003" in err
    assert main.main(["--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_resuming_a_checkpoint_of_another_config_or_shape_is_an_error(uninterrupted, tmp_path, capsys):
    _, _, reference = uninterrupted("adamw", *SCENARIOS["adamw"])
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / rundir.SUMMARY).unlink()
    saved = rundir.read_json(out / rundir.CONFIG)
    saved["model"]["dim"] = 32
    rundir.write_json_atomic(out / rundir.CONFIG, saved)
    assert main.main(["--resume", "--out", str(out), "--no-plot"]) == 2
    assert "belongs to another config" in capsys.readouterr().err
    checkpoint = checkpoints.latest_checkpoint(out)
    model = models.Transformer(models.ModelConfig(dim=32, depth=2), 13)
    with pytest.raises(checkpoints.CheckpointError, match="has shape .* in the model \\(a checkpoint of another model shape"):
        checkpoints.check_parameters(checkpoint, model)


def test_checkpoints_keep_the_last_two_and_snapshots_every_interval(tmp_path):
    cfg = override(Config(), {**SMALL, "train.epochs": 6})
    train(cfg, tmp_path, progress=False, checkpoint_every=Interval("epochs", 1), snapshot_every=Interval("epochs", 2))
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == ["step_000000020", "step_000000024"]
    assert rundir.read_json(checkpoints.checkpoint_dirs(tmp_path)[-1] / "checkpoint.json")["finished"]
    snapshots = sorted(p.name for p in (tmp_path / checkpoints.SNAPSHOTS).iterdir())
    assert snapshots == [f"step_{s:09d}.safetensors" for s in (0, 8, 16, 24)]
    arrays, meta = mx.load(str(tmp_path / "snapshots" / snapshots[1]), return_metadata=True)
    assert meta == {"epoch": "2", "step": "8"} and "blocks.1.ff.w2.weight" in arrays


def test_log_spaced_snapshots_and_step_intervals():
    log = Interval.parse("log:5", "--snapshot-every")
    assert list(log.steps(10_000)) == [1, 10, 100, 1000, 10_000]
    assert log.next_stop(10, 10_000) == 100 and log.next_stop(10_000, 10_000) is None
    every = Interval.parse("500steps", "--checkpoint-every")
    assert (every.unit, every.n, every.next_stop(1000, 10 ** 6)) == ("steps", 500, 1500)
    assert Interval.parse("off", "--checkpoint-every") is None
    for bad in ("0steps", "-3", "log:", "ten", "1.5"):
        with pytest.raises(ValueError, match="must be N \\(epochs\\), Nsteps or log:N"):
            Interval.parse(bad, "--checkpoint-every")


def test_a_diverging_run_stops_and_is_recorded_with_valid_json(tmp_path):
    cfg = override(Config(), {**SMALL, "optim.name": "adamw", "optim.lr": 1e8, "optim.warmup_steps": 0,
                              "optim.weight_decay": 0.0, "train.epochs": 30})
    summary = train(cfg, tmp_path, progress=False)
    assert summary["diverged"] and summary["diverged_at_epoch"] == summary["epochs_run"] < 30
    assert not summary["early_stopped"]
    text = (tmp_path / rundir.METRICS).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert rundir.read_metrics(tmp_path)[-1]["train_loss"] is None or rundir.read_metrics(tmp_path)[-1]["val_loss"] is None
