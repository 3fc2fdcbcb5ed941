"""What runs inside a SLURM job: one stage (pretraining or the linear probes) on every task.

submitit pickles a `Stage` and runs it once per task (one task per GPU). `and_dist.platform.dist.init`
finds rank, world size and the rendezvous address in the SLURM_* variables, so nothing here
touches torch.distributed. The stage imports `and_dist` from the code snapshot taken at submission
(launch/snapshot.py), so the job, its requeues and its probe job run the submitted code.

Preemption and time limits: SLURM sends SIGUSR2 before the end (`--signal=USR2@...`, or
`scancel --signal=USR2`). While training (or probing) the stage's own handler (and_dist/run/stop.py)
saves a checkpoint at the next step boundary, `main` returns 128 + USR2 and submitit's handler is
back in place. Task 0 then hands it the signal again: submitit calls `Stage.checkpoint()`, stores
the returned copy of the stage and runs `scontrol requeue`; the other tasks end quietly. The
requeued job (same job id, same run_dir, `resume=auto`) continues from that checkpoint.
`max_requeues` bounds the loop. A stage whose ranks timed out waiting for a stalled rank (exit 3,
`train.collective_timeout`) is requeued the same way by task 0, and resumes from the last
checkpoint (when task 0 itself is the stalled one, the job ends as failed when the other tasks
exit). A stage that fails (exit 1 or 2) raises: the job fails and is never requeued. SIGTERM (scancel, or a preemption that SLURM requeues itself) is not requeued here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)   # 128+N from the trainer: requeue
VERSION_ENV = "AND_CODE_VERSION"   # and_dist.platform.version.ENV (this file must not import and_dist)
EXIT_STALLED = 3       # and_dist.platform.errors.EXIT_STALLED: a rank stopped answering; requeue too
# torchrun's variables win over SLURM's in and_dist/platform/cluster.py; inherited from the shell that
# submitted (sbatch exports it), they would put every task at the same rank
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class StageFailed(RuntimeError):
    """The stage ended without finishing; raised so that SLURM marks the job failed."""


@dataclass(frozen=True)
class Stage:
    kind: str                   # "train" or "probe"
    config: str                 # the config file frozen at submission
    overrides: tuple[str, ...]
    run_dir: str
    max_requeues: int = 0
    requeues: int = 0           # how often this stage has been requeued so far
    code: str = ""              # the code snapshot taken at submission (launch/snapshot.py); "": the install's
    version: str = ""           # and_dist.platform.version at submission, as JSON (a snapshot has no .git)

    def argv(self) -> list[str]:
        if self.kind == "train":
            return ["--config", self.config, *self.overrides, f"run_dir={self.run_dir}", "resume=auto"]
        return ["--checkpoint", self.run_dir, *self.overrides]

    def __call__(self) -> int:
        for name in TORCHRUN_VARS:
            os.environ.pop(name, None)
        self._use_snapshot()
        if self.kind == "train":
            from and_dist.train import main
        else:
            from and_dist.probe import main
        try:
            status = main(self.argv())
        except SystemExit as e:     # a config mistake exits 2 from inside main
            status = e.code if isinstance(e.code, int) else 1
        if status == 0:
            return 0
        if status <= 128 and status != EXIT_STALLED:
            raise StageFailed(f"{self.kind} stage failed with exit status {status}: see this job's logs "
                              f"and {self.run_dir}/errors.log; not requeued")
        if int(os.environ.get("SLURM_PROCID", "0")) != 0:
            return status           # task 0 decides: requeue, or fail the job
        if status == EXIT_STALLED or status - 128 in PREEMPT_SIGNALS:
            self._requeue()
        if status == EXIT_STALLED:
            raise StageFailed(f"{self.kind} stage stopped: a rank stopped answering (see the log); not requeued")
        raise StageFailed(f"{self.kind} stage stopped by signal {status - 128} after saving a checkpoint; "
                          "not requeued (scancel, or a preemption that SLURM requeues itself)")

    def _use_snapshot(self) -> None:
        """Import and_dist from the snapshot: first on sys.path (before the job's working directory,
        which `python -m` puts there, and the editable install's finder, which comes after every
        path entry) and on PYTHONPATH for any child process."""
        if self.version:
            os.environ[VERSION_ENV] = self.version
        if not self.code:
            return
        sys.path.insert(0, self.code)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (self.code, os.environ.get("PYTHONPATH")) if p)
        import and_dist
        if not and_dist.__file__.startswith(self.code + os.sep):
            raise StageFailed(f"and_dist was imported from {and_dist.__file__}, not the snapshot {self.code}")
        print(f"code: {self.code} (snapshot taken at submission)", flush=True)

    def _requeue(self) -> None:
        """Give the signal to submitit's handler (the stage restored it): it calls checkpoint(),
        runs `scontrol requeue` and exits, or raises when the job may not be requeued."""
        from submitit import JobEnvironment
        wandb = sys.modules.get("wandb")
        if wandb is not None:       # close its service now: the requeue kills it mid-exit otherwise
            wandb.teardown()
        try:
            signal.raise_signal(JobEnvironment._usr_sig())
        except subprocess.CalledProcessError as e:     # e.g. JobRequeue=0 at this site
            raise StageFailed(f"the checkpoint is saved but SLURM refused to requeue the job ({e}); continue "
                              f"it with launch/slurm.py ... run_dir={self.run_dir} resume=auto") from None

    def checkpoint(self, *args, **kwargs):
        """submitit's hook: what to run when the job is requeued (None: do not requeue)."""
        if self.requeues >= self.max_requeues:
            print(f"not requeued: {self.requeues} of at most {self.max_requeues} requeues used", flush=True)
            return None
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(replace(self, requeues=self.requeues + 1))
