"""kNN top-1 per round of several runs in one chart, to compare configurations (for instance AND
against the `curriculum.method=instance` baseline at the same budget), with the neighbourhood
consistency of each discovery beside it: the anchors' and all samples'.

    python tools/plot_runs.py RUN [RUN ...] [--out FILE.png]

A RUN is a run directory. Its rounds come from summary.json ("rounds") and from the "round"
lines of metrics.jsonl (so a run still in progress shows the rounds it has finished), the
all-sample consistency from its "diagnostics" lines; nothing else in it is read but
config.yaml, for the line's label. Exit status 2 with one line when a path is not a run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from and_dist.platform.errors import EXIT_USER_ERROR, UserError
from and_dist.platform.log import read_events
from and_dist.platform.plots import compare_chart


DIAGNOSTIC_KEYS = ("all_consistency", "chance_consistency")


def round_rows(run: Path) -> list[dict]:
    """The run's per-round rows, by round number; metrics.jsonl (newer while a run goes on)
    wins over summary.json. A round's row takes the all-sample consistency of its discovery
    from the "diagnostics" lines, where the run wrote them."""
    summary, metrics = run / "summary.json", run / "metrics.jsonl"
    if not run.is_dir() or not (summary.is_file() or metrics.is_file()):
        raise UserError(f"{run} is not a run directory (it has no summary.json or metrics.jsonl)")
    by_round = {}
    if summary.is_file():
        try:
            rows = json.loads(summary.read_text()).get("rounds") or []
        except (json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"{summary} is not a run summary ({e})") from None
        by_round.update((r["round"], r) for r in rows)
    by_round.update((e["round"], e) for e in read_events(run, "round"))
    diagnostics = {e["round"]: {k: e.get(k) for k in DIAGNOSTIC_KEYS} for e in read_events(run, "diagnostics")}
    return [{**by_round[r], **diagnostics.get(r, {})} for r in sorted(by_round)]


def label(run: Path) -> str:
    """config name/folder, plus the method when it is not AND."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    name = f"{cfg['name']}/{run.name}" if cfg.get("name") else run.name
    method = (cfg.get("curriculum") or {}).get("method", "and")
    return name if method == "and" else f"{name} [{method}]"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _frac(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    parser.add_argument("--out", type=Path, default=Path("runs-knn.png"), help="PNG to write")
    args = parser.parse_args(argv)
    try:
        series = {}
        for run in args.runs:
            rows = round_rows(run)
            if not rows:
                print(f"{run}: no finished round yet; left out", file=sys.stderr)
                continue
            name, n = label(run), 2
            key = name
            while key in series:                # two runs with the same label stay apart
                key, n = f"{name} ({n})", n + 1
            series[key] = rows
        if not series:
            raise UserError("none of the runs has a finished round to draw")
    except UserError as e:
        print(f"plot_runs: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    path = compare_chart(args.out, series)
    for key, rows in series.items():
        print(f"{key}: kNN top-1 " + " ".join(f"r{r['round']}={_pct(r.get('knn_top1'))}" for r in rows)
              + "; consistency anchors/all " + " ".join(f"r{r['round']}={_frac(r.get('consistency'))}/"
                                                      f"{_frac(r.get('all_consistency'))}" for r in rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
