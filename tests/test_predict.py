"""``predict.py``: answers from a run's saved parameters, accuracy by split, the error figure, bad input."""
import re
import shutil

import pytest

import predict
from config import Config, override
from training.checkpoints import Interval
from training.loop import train

RUN = {"data.p": 11, "data.op": "/", "model.dim": 32, "model.depth": 1, "model.dropout": 0.0, "optim.lr": 3e-3,
       "train.batch_size": 16, "train.epochs": 40, "data.train_fraction": 0.6}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(override(Config(), RUN), out, progress=False, checkpoint_every=Interval("epochs", 10),
          snapshot_every=Interval("epochs", 20))
    return out


def test_answers_name_the_true_answer_and_the_split(run_dir, capsys):
    assert predict.main([str(run_dir), "7/3", " 10 / 4 "]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("checkpoints/step_000000200/model.safetensors")
    for line, truth in zip(lines[1:], (7 * pow(3, 9, 11) % 11, 10 * pow(4, 9, 11) % 11)):
        match = re.match(r"(\d+) / (\d+) = (\d+) \(p=([0-9.]+)\); top 3: (.*); true (\d+) (right|WRONG) "
                         r"\((train|validation) pair\)", line)
        assert match, line
        assert int(match[6]) == truth and (match[7] == "right") == (int(match[3]) == truth)
        top = [float(x.split()[1]) for x in match[5].split(", ")]
        assert len(top) == 3 and top == sorted(top, reverse=True) and float(match[4]) == top[0]


def test_all_reports_accuracy_by_split_and_draws_the_errors(run_dir, capsys):
    assert predict.main([str(run_dir), "--all"]) == 0
    out = capsys.readouterr().out
    accuracy = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"(\w+)\s+accuracy [0-9.]+ \((\d+) / (\d+)\)", out)}
    assert accuracy["train"][1] + accuracy["validation"][1] == accuracy["all"][1] == 11 * 10
    assert accuracy["train"][1] == int(0.6 * 110)
    assert (run_dir / "predictions.png").stat().st_size > 10_000 and (run_dir / "predictions_dark.png").exists()


def test_a_snapshot_or_a_named_checkpoint_can_be_loaded(run_dir, tmp_path, capsys):
    assert predict.main([str(run_dir), "1/1", "--checkpoint", str(run_dir / "snapshots" / "step_000000100.safetensors")]) == 0
    assert "step_000000100.safetensors" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")
    assert predict.main([str(copy), "1/1"]) == 0  # no checkpoint: the last snapshot
    assert "snapshots/step_000000200.safetensors" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["3+4"], "this run learned '/', not '+'"),
    (["3/0"], "b=0 has no inverse mod 11"),
    (["11/2"], "a=11 is outside 0..10"),
    (["2/-1"], "is not 'a / b' with whole numbers"),
    (["two/one"], "is not 'a / b' with whole numbers"),
    ([], "give prompts such as"),
    (["1/2", "--checkpoint", "/nonexistent"], "no such checkpoint directory or snapshot file"),
])
def test_bad_prompts_fail_in_one_line(run_dir, capsys, argv, message):
    assert predict.main([str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_directory_without_a_run_or_parameters_is_an_error(tmp_path, capsys):
    assert predict.main([str(tmp_path), "1/2"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    train(override(Config(), RUN | {"train.epochs": 1}), tmp_path, progress=False)
    assert predict.main([str(tmp_path), "1/2"]) == 2
    assert "holds no checkpoint or snapshot" in capsys.readouterr().err
