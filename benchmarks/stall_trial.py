"""Reliability trial: the stalled-rank test repeated on a loaded machine.

    python benchmarks/stall_trial.py [--repeats 20] [--hogs 2]

`--hogs` busy processes spin beside each repeat (a CI machine shares its 2 cores with the whole
suite). A repeat passes when the test passes: rank 1 stopped by SIGSTOP is named and killed by
rank 0 and torchrun never falls back to its 30 s SIGTERM wait. Prints each repeat's wall time
and the pass count.
"""
import argparse
import multiprocessing as mp
import subprocess
import sys
import time

from common import REPO

TEST = "tests/test_reliability.py::test_a_stopped_rank_ends_the_run_within_the_timeout_naming_it_and_the_run_resumes"


def spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hogs", type=int, default=2)
    args = ap.parse_args()
    hogs = [mp.Process(target=spin, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    passed, times = 0, []
    try:
        for i in range(args.repeats):
            t0 = time.time()
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                                  cwd=REPO, capture_output=True, text=True)
            times.append(time.time() - t0)
            passed += done.returncode == 0
            print(f"repeat {i + 1}: {'pass' if done.returncode == 0 else 'FAIL'} in {times[-1]:.0f} s", flush=True)
            if done.returncode:
                print(done.stdout[-3000:], flush=True)
    finally:
        for h in hogs:
            h.terminate()
    times.sort()
    print(f"{passed}/{args.repeats} passed with {args.hogs} busy processes beside; "
          f"wall per repeat median {times[len(times) // 2]:.0f} s [{times[0]:.0f}-{times[-1]:.0f}]")


if __name__ == "__main__":
    main()
