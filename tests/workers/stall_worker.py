"""Worker for the stalled-rank tests, run as `torchrun --nproc_per_node=2 stall_worker.py WHERE`.

Rank 1 stops itself (SIGSTOP) just before the wait named WHERE, so rank 0 meets the stall there
every time instead of wherever a test's signal happens to land: `ddp_forward` (DDP's buffer
broadcast before a forward), `ddp_backward` (DDP's gradient all-reduce), `helper` (one of
dist.py's named waits). Rank 0 reports through the entry points' Session, as training does.
"""
import os
import signal
import sys

import torch

from and_dist.platform import dist
from and_dist.run.entry import Session


class Settings:
    device, collective_timeout = "cpu", float(os.environ.get("STALL_TIMEOUT", "3"))


def body(session: Session) -> int:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))   # buffers: DDP broadcasts them
    model = dist.data_parallel(net, session.env)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()                    # one whole step together: DDP is built
    where = sys.argv[1]
    if session.env.rank == 1 and where != "ddp_backward":
        os.kill(os.getpid(), signal.SIGSTOP)
    if where == "helper":
        dist.all_reduce(torch.ones(1))
        return 0
    out = model(x)
    if session.env.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    out.sum().backward()
    return 0


if __name__ == "__main__":
    sys.exit(Session(Settings).run(body))
