"""Helpers the test modules share (pytest puts this folder on sys.path)."""
import socket
from pathlib import Path

TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"          # scripts the multi-process tests start under torchrun


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
