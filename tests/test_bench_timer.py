"""The benchmarks' one timer (benchmarks/common.measure, torch.utils.benchmark's Timer): the calls
it makes, the time per call, and torch's thread count left as the caller set it (the Timer's
default would time every CPU benchmark on one thread)."""
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).parent.parent / "benchmarks"))
from common import measure  # noqa: E402


def test_measure_times_steps_after_warmup_at_the_callers_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def step():
            seen.append(torch.get_num_threads())
            time.sleep(0.002)
        t0 = time.perf_counter()
        per_call = measure(step, steps=20, warmup=5)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 25 and set(seen) == {2}
    # one timed call, not the 20 summed nor the warm-up counted: bounds from this run's own clock
    assert 0.002 <= per_call <= elapsed / 20
