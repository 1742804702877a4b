"""A sweep's worker process: ``python -m sweeps.worker RUN_DIR HASH`` trains ``RUN_DIR/config.json`` into RUN_DIR."""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import sys
from pathlib import Path

from config import config_from_dict
from sweeps.spec import config_hash
from training.loop import train
from training.rundir import CONFIG, read_json


def main(run_dir: str, expected_hash: str) -> int:
    run_dir = Path(run_dir)
    cfg = config_from_dict(read_json(run_dir / CONFIG))
    assert config_hash(cfg) == expected_hash, f"{run_dir}: config.json does not match hash {expected_hash}"
    train(cfg, run_dir, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
