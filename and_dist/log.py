"""Run logging: console, `metrics.jsonl`, wandb and progress bars, all from rank 0 only."""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm


class _NoBar:
    def update(self, n=1): pass
    def set_postfix(self, *a, **k): pass
    def close(self): pass


class RunLog:
    """Everything a run reports. Non-zero ranks get a silent instance."""

    def __init__(self, run_dir: Path | None, enabled: bool, progress: bool = True,
                 wandb_mode: str = "disabled", wandb_project: str = "and_dist",
                 wandb_entity: str = "", config: dict | None = None, name: str = ""):
        self.enabled, self.progress = enabled, progress and enabled
        self.metrics_path = run_dir / "metrics.jsonl" if (enabled and run_dir) else None
        self.wandb = None
        if enabled and wandb_mode != "disabled":
            self.wandb = _start_wandb(run_dir, wandb_mode, wandb_project, wandb_entity, config, name)

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def event(self, **fields) -> None:
        """One JSON line in metrics.jsonl, and the numeric fields to wandb."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(fields) + "\n")
        if self.wandb is not None:
            step = fields.get("step")
            self.wandb.log({k: v for k, v in fields.items() if isinstance(v, (int, float))}, step=step)

    def metrics_lines(self) -> int:
        if not (self.enabled and self.metrics_path.exists()):
            return 0
        with open(self.metrics_path) as f:
            return sum(1 for _ in f)

    def truncate_metrics(self, lines: int) -> None:
        """On resume, drop events logged after the checkpoint (they will be logged again)."""
        if not (self.enabled and self.metrics_path.exists()):
            return
        with open(self.metrics_path) as f:
            kept = f.readlines()[:lines]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.metrics_path)

    def bar(self, total: int, desc: str, leave: bool = False):
        if not self.progress:
            return _NoBar()
        return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir, mode, project, entity, config, name):
    """wandb with its files in the run directory; online falls back to offline, never blocks."""
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    kwargs = dict(project=project, entity=entity or None, name=name, dir=str(run_dir), id=run_id,
                  resume="allow", config=config)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60), **kwargs)
    except Exception as e:  # noqa: BLE001 - any network failure must not stop training
        print(f"wandb {mode} failed ({e}); logging offline instead", file=sys.stderr)
        return wandb.init(mode="offline", **kwargs)
