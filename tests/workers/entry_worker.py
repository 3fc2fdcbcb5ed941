"""Worker for tests/test_torchrun_errors.py, run as `torchrun ... tests/workers/entry_worker.py
LINGER TIMEOUT RUN`: an entry point's Session (train, probe and evaluate share it) where rank 1 raises while
rank 0 waits in a collective; rank 1 then takes LINGER more seconds to exit (a slow teardown), so
rank 0 may end first, by its train.collective_timeout of TIMEOUT seconds."""
import atexit
import sys
import time
from pathlib import Path

import torch

from and_dist.config import Config
from and_dist.platform import dist
from and_dist.run.entry import Session


def body(session: Session) -> int:
    session.lock(Path(sys.argv[3]))        # the run directory: errors.log and comm_traces/ go there
    if session.env.rank == 1:
        time.sleep(1)                      # rank 0 is in its collective by then
        atexit.register(time.sleep, float(sys.argv[1]))
        raise ValueError("planted failure on rank 1")
    dist.all_reduce(torch.ones(1))
    return 0


if __name__ == "__main__":
    cfg = Config()
    cfg.train.device, cfg.train.collective_timeout = "cpu", float(sys.argv[2])
    sys.exit(Session(cfg.train).run(body))
