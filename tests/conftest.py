"""Put the repository root on the path and load the optimized BLAS before anything imports mlx."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastblas  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cpu_stream():
    """A module's tests on the CPU stream (``pytestmark = pytest.mark.usefixtures("cpu_stream")``), also on a
    machine whose default device is a GPU: float64 exists on the CPU only, and the speed layer's paths and native
    code are the CPU backend's (where the trainer does not take them on a GPU)."""
    with mx.stream(mx.cpu):
        yield
