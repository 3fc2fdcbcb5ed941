"""A user mistake (bad config, bad data, wrong checkpoint): reported as one line, exit status 2.

Anything else is a bug or a system failure: one line per failing rank, exit status 1, and the
traceback in the run's `errors.log` (and on the console with AND_DEBUG=1); a wait on another rank
that timed out or broke is exit status 3, its line naming the rank that stopped answering."""
from __future__ import annotations

import os
import sys
import traceback


class UserError(Exception):
    """The message is one line meant for the terminal."""


EXIT_USER_ERROR = 2
EXIT_STALLED = 3      # a wait on another rank timed out: worth a requeue (launch/job.py)


def exit_status(e: BaseException, env, run_dir=None) -> int:
    """Report an exception that ends an entry point (inside its `except`) and return its status."""
    if isinstance(e, UserError):
        record_for_torchrun(e)
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    from .flight import dump
    from .stall import end_silent, explain     # a wait on another rank that failed: name that rank
    line = explain(e, env.rank)
    record_for_torchrun(e)
    traces = dump(env.rank, env.world) if env.world > 1 else None   # every failing rank's collectives
    status = 1 if line is None else EXIT_STALLED
    if line is None:
        line = str(e) if getattr(e, "one_line", False) else f"{type(e).__name__}: {e}"
    elif traces is not None:
        line += f"; collective traces in {traces} (torchfrtrace {traces} -p rank_)"
    print(f"[rank {env.rank}] error: {line}", file=sys.stderr, flush=True)
    end_silent()                          # after the line: the launcher may end this rank next
    text = traceback.format_exc()
    if os.environ.get("AND_DEBUG"):
        print(text, file=sys.stderr)
    if run_dir is not None:
        try:
            with open(os.path.join(run_dir, "errors.log"), "a") as f:
                f.write(f"[rank {env.rank}]\n{text}\n")
        except OSError:
            pass
    return status


def record_for_torchrun(e: BaseException) -> None:
    """Under torchrun, write `e` and its traceback to the error file torchrun gave this rank
    (TORCHELASTIC_ERROR_FILE), as its `@record` decorator would: torchrun's failure summary then
    names the first failing rank (by the time written here, not the time its process ended) with
    its exception, instead of "error_file: <N/A>"."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler
    try:
        get_error_handler().record_exception(e)
    except OSError:
        pass                     # the summary then lacks the traceback; the rank's line is printed anyway
