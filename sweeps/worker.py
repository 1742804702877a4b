"""A sweep's worker process: ``python -m sweeps.worker RUN_DIR HASH [CHECKPOINT_EVERY]`` trains ``RUN_DIR/config.json``
into RUN_DIR, continuing from the run's checkpoint when it has one."""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import sys
from pathlib import Path

from config import config_from_dict, config_hash
from training.checkpoints import Interval
from training.loop import train
from training.rundir import CONFIG, read_json


def main(run_dir: str, expected_hash: str, checkpoint_every: str = "off") -> int:
    run_dir = Path(run_dir)
    cfg = config_from_dict(read_json(run_dir / CONFIG))
    assert config_hash(cfg, len(expected_hash)) == expected_hash, f"{run_dir}: config.json is not run {expected_hash}"
    train(cfg, run_dir, progress=False, checkpoint_every=Interval.parse(checkpoint_every, "checkpoint_every"),
          resume=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
