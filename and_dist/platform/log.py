"""Run logging from rank 0: console lines, `metrics.jsonl`, wandb, and progress bars (on a
terminal only; a log file gets one line per epoch instead of bar redraws)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from . import files


class NoBar:
    def update(self, n=1): pass
    def close(self): pass


class _LineBar(NoBar):
    """Progress for a log file: one line every `every` seconds, only for steps that take longer
    (discovery, feature extraction of a large set), never redraws."""

    def __init__(self, total: int, desc: str, say, every: float = 60.0, unit: str = "it"):
        self.total, self.desc, self.say, self.every, self.unit = total, desc, say, every, unit
        self.done, self.start = 0, time.time()
        self.last = self.start

    def update(self, n=1):
        self.done += n
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.say(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                     f"{rate:.0f}/s, ETA {eta / 60:.1f} min")


def progress_bar(total: int, desc: str, tty: bool, say, every: float = 60.0, unit: str = "it"):
    """A tqdm bar on a terminal, else a line to `say` every `every` seconds (a job's log file)."""
    if tty:
        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
    return _LineBar(total, desc, say, every, unit)


def strict(value):
    """JSON-safe: NaN/inf become null (strict parsers reject them), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def fmt(value, spec: str = ".2f") -> str:
    """A number for the console, "-" where it was not measured."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


METRICS_FILE = "metrics.jsonl"


def read_events(run_dir: Path, *kinds: str) -> list[dict]:
    """The run's metrics.jsonl events, in order (of `kinds` only, when given); none before the file
    exists. A line still being written (a run in progress) is left out."""
    path, out = Path(run_dir) / METRICS_FILE, []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict) and (not kinds or e.get("event") in kinds):
            out.append(e)
    return out


class RunLog:
    """Everything a run reports; a checkpoint owner (metrics lines written, wandb run id).
    Non-zero ranks get a silent instance."""

    def __init__(self, run_dir: Path | None, enabled: bool, progress: bool = True,
                 wandb_mode: str = "disabled", wandb_project: str = "and_dist",
                 wandb_entity: str = "", config: dict | None = None, name: str = ""):
        self.enabled = enabled
        self.tty = enabled and progress and sys.stderr.isatty()
        self.dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE if (enabled and run_dir) else None
        self.wandb_args = (wandb_mode, wandb_project, wandb_entity, config, name)
        self.wandb_id = uuid.uuid4().hex[:8]      # a fresh run's; a resumed run loads its own
        self.wandb = None
        self.sections: dict[str, tuple[list[str], str]] = {}
        self.wandb_offset = 0                     # wandb step = step + this (see load_state_dict)

    @classmethod
    def for_config(cls, run_dir: Path, enabled: bool, cfg, name: str = "") -> "RunLog":
        """The log a run's config asks for (`log` section; wandb gets the whole config and the code
        version)."""
        from dataclasses import asdict
        c = cfg.log
        from .version import code_version
        return cls(run_dir, enabled, c.progress, c.wandb_mode, c.wandb_project, c.wandb_entity,
                   {**asdict(cfg), "code": code_version()}, name or cfg.name)

    def start_wandb(self) -> None:
        """After resume (which may restore the id), so a resumed run continues its wandb run."""
        mode, project, entity, config, name = self.wandb_args
        if self.enabled and mode != "disabled":
            self.wandb = _start_wandb(self.dir, mode, project, entity, config, name, self.wandb_id)
            for event, (names, step_key) in self.sections.items():
                self._define(event, names, step_key)

    def group(self, event: str, names: list[str], step_key: str) -> None:
        """wandb: the fields `<name>_<metric>` of `event` events also go to a section per name
        (`<event>-<name>/<metric>`, e.g. one section per probed layer), all plotted against the
        event's own `step_key` field (e.g. the probe epoch) rather than wandb's step."""
        self.sections[event] = (list(names), step_key)
        if self.wandb is not None:
            self._define(event, names, step_key)

    def _define(self, event: str, names: list[str], step_key: str) -> None:
        x = f"{event}/{step_key}"
        self.wandb.define_metric(x)
        self.wandb.define_metric(f"{event}/*", step_metric=x)
        for name in names:
            self.wandb.define_metric(f"{event}-{name}/*", step_metric=x)

    def info(self, msg: str) -> None:
        if self.enabled:
            if self.tty:
                tqdm.write(msg, file=sys.stdout)
            else:
                print(msg, file=sys.stdout)
            sys.stdout.flush()

    def event(self, **fields) -> None:
        """One JSON line in metrics.jsonl, and the numeric fields to wandb."""
        if not self.enabled:
            return
        fields = strict(fields)
        step = fields.get("step")
        if self.wandb is not None and step is not None:
            fields["wandb_step"] = step + self.wandb_offset
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(fields) + "\n")
        if self.wandb is not None:
            prefix = fields.get("event", "")
            row = {f"{prefix}/{k}": v for k, v in fields.items()
                   if isinstance(v, (int, float)) and k not in ("step", "wandb_step")}
            for name in self.sections.get(prefix, ([], ""))[0]:
                row.update({f"{prefix}-{name}/{k[len(name) + 1:]}": v for k, v in fields.items()
                            if k.startswith(name + "_") and isinstance(v, (int, float))})
            if step is not None:
                row["global_step"] = step
            self.wandb.log(row, step=fields.get("wandb_step"))

    def image(self, key: str, path: Path | None, step: int) -> None:
        if self.wandb is not None and path is not None:
            import wandb
            self.wandb.log({key: wandb.Image(str(path))}, step=step + self.wandb_offset)

    def bar_chart(self, key: str, values: dict[str, float | None], title: str, step: int | None = None) -> None:
        """One wandb bar chart (a table of name, top-1), e.g. the probe accuracy by layer."""
        if self.wandb is not None:
            import wandb
            table = wandb.Table(columns=["name", "top1"], data=[[k, v] for k, v in values.items() if v is not None])
            self.wandb.log({key: wandb.plot.bar(table, "name", "top1", title=title)},
                           step=None if step is None else step + self.wandb_offset)

    def bar(self, total: int, desc: str, leave: bool = False):
        if not self.tty:
            return _LineBar(total, desc, self.info) if self.enabled else NoBar()
        return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)

    # checkpoint owner
    def state_dict(self) -> dict:
        lines = 0
        if self.enabled and self.metrics_path.exists():
            with open(self.metrics_path) as f:
                lines = sum(1 for _ in f)
        return {"metrics_lines": lines, "wandb_id": self.wandb_id, "wandb_offset": self.wandb_offset}

    def load_state_dict(self, s: dict) -> None:
        """On resume, drop events logged after the checkpoint (they will be logged again).

        wandb ignores a step at or below the last one it saw, so the re-run steps are logged to
        wandb under `step + wandb_offset`, the offset grown past every wandb step logged so far
        (`wandb_step` in the dropped lines, and `.wandb-step` for lines dropped by an earlier
        resume); each wandb row also carries the true `global_step`."""
        self.wandb_id = s.get("wandb_id", self.wandb_id)
        self.wandb_offset = s.get("wandb_offset", 0)
        if self.enabled and self.metrics_path.exists():
            with open(self.metrics_path) as f:
                lines = f.readlines()
            kept = lines[: s["metrics_lines"]]
            self._grow_offset(kept, lines[s["metrics_lines"]:])
            files.write_text(self.metrics_path, "".join(kept))

    def _grow_offset(self, kept: list[str], dropped: list[str]) -> None:
        mark = self.dir / ".wandb-step"
        seen = [json.loads(line).get("wandb_step") for line in dropped]
        seen = [v for v in seen if v is not None]
        try:
            seen.append(int(mark.read_text()))
        except (OSError, ValueError):
            pass
        if not seen:
            return
        high = max(seen)
        steps = [json.loads(line).get("step") for line in kept]
        lowest = max([v for v in steps if v is not None], default=0)   # no re-run step is lower
        self.wandb_offset = max(self.wandb_offset, high + 1 - lowest)
        files.write_text(mark, str(high))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(run_dir, mode, project, entity, config, name, run_id):
    """wandb with its files in the run directory; online falls back to offline, never blocks."""
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    kwargs = dict(project=project, entity=entity or None, name=name, dir=str(run_dir), id=run_id,
                  resume="allow", config=config)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60), **kwargs)
    except Exception as e:  # noqa: BLE001 - any network failure must not stop training
        print(f"wandb {mode} failed ({e}); logging offline instead", file=sys.stderr)
        return wandb.init(mode="offline", **kwargs)
