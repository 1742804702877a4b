"""The harness of ``quad_step.py`` and ``dropout_masks.py``: variants timed in one process, in alternating rounds, so
that load from other processes hits them alike."""
import statistics
import time


def alternate_rounds(runs: dict, calls: int, rounds: int, warmup: int = 5) -> dict:
    """``{label: (min, median)}`` of the wall ms per call of each zero-argument ``runs[label]``, over ``rounds``
    rounds of ``calls`` calls, the variants in turn, after ``warmup`` unmeasured calls of each (tracing, kernel
    builds)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    wall = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            tick = time.perf_counter()
            for _ in range(calls):
                run()
            wall[label].append(1e3 * (time.perf_counter() - tick) / calls)
    return {label: (min(ms), statistics.median(ms)) for label, ms in wall.items()}
