"""What a run shows a person: the summary (summary.json and its closing lines) and the pictures
of what AND found, drawn at each discovery and at the end of each round (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path

from ..platform import dist
from ..platform.files import WriteError, write_text
from ..platform.log import fmt, strict
from ..platform.version import code_version


class SummaryFailed(RuntimeError):
    one_line = True


class Report:
    def __init__(self, run_dir: Path, log, enabled: bool):
        self.dir, self.log, self.enabled = run_dir, log, enabled

    def discovery(self, round_: int, curriculum, data, step: int, free=None, seconds: float | None = None,
                  ages=None) -> None:
        """Anchors with their neighbours, the entropy histogram with the anchor cut-off, and the
        neighbourhood diagnostics: label-free (`free`, label_free.LabelFree) and, with labels,
        the consistency by entropy decile; `ages`: (each bank row's age in steps, steps per epoch)."""
        if not self.enabled:
            return
        self.diagnostics(round_, curriculum, data.train.labels, step, free, seconds, ages)
        from . import neighbourhoods
        neighbourhoods.write(self.dir / "neighbourhoods" / f"round{round_}.npz", round_, step, curriculum, free,
                             data.train.path, len(data.train), None if ages is None else ages[0])
        from ..platform import plots
        nb = curriculum.nbhd
        from ..data.sources.images import labelled
        grid = plots.anchor_grid(self.dir / f"anchors-round{round_}.png", nb.entropy, nb.neighbours, curriculum.anchor,
                                 data.train.labels if labelled(data) else None, data.pictures, round_)
        hist = plots.entropy_histogram(self.dir / f"entropy-round{round_}.png", nb.entropy,
                                       curriculum.anchor, round_)
        for key, path in (("pictures/anchors", grid), ("pictures/entropy", hist)):
            if path is not None:
                self.log.image(key, path, step)

    def diagnostics(self, round_: int, curriculum, labels, step: int, free=None, seconds: float | None = None,
                    ages=None) -> None:
        """One `diagnostics` event (metrics.jsonl, wandb) with the label-free measures and, with
        labels, the consistency, each by entropy decile and for anchors against the rest; console
        lines and pictures of each kind."""
        from ..method.diagnostics import diagnose
        from ..platform import plots
        nb = curriculum.nbhd
        diag = diagnose(nb.entropy, nb.neighbours, curriculum.anchor, labels)
        metrics = {"anchors": int(curriculum.anchor.sum()), "discovery_seconds": seconds}
        if ages is not None:
            from ..method.bank import age_summary
            metrics.update(age_summary(*ages))
            self.log.info(f"round {round_} bank rows used: median age {fmt(metrics['bank_age_median_steps'], '.0f')} "
                          f"steps ({fmt(metrics['bank_age_median_epochs'], '.2f')} epochs), 90th percentile "
                          f"{fmt(metrics['bank_age_p90_steps'], '.0f')} steps ({fmt(metrics['bank_age_p90_epochs'], '.2f')} "
                          f"epochs); {metrics['bank_never_updated']} never updated")
        if free is not None:
            metrics.update(free.summary(nb.entropy, curriculum.anchor))
            for name in free.per_sample:
                size = f", sample {free.sample_size}" if name == "view_agreement" else ""
                self.log.info(f"round {round_} {name} {fmt(metrics[name], '.3f')} (anchors "
                              f"{fmt(metrics[f'anchor_{name}'], '.3f')}, rest {fmt(metrics[f'rest_{name}'], '.3f')}"
                              f"{size}; {metrics[f'{name}_seconds']:.2f}s); by entropy decile: "
                              + " ".join(fmt(metrics[f"decile{d}_{name}"], ".2f") for d in range(1, 11)))
            path = plots.label_free_chart(self.dir / f"label-free-round{round_}.png", metrics, round_)
            self.log.image("pictures/label_free", path, step)
        if diag is None:
            self.log.info(f"round {round_}: no labels (fewer than two classes), so no consistency diagnostic")
        else:
            metrics.update(diag.metrics())
            self.log.info(f"round {round_} consistency by entropy decile (lowest first): "
                          + " ".join(fmt(v, ".2f") for v in diag.deciles)
                          + f"; anchors {fmt(diag.anchors, '.3f')}, rest {fmt(diag.rest, '.3f')}, "
                          f"chance {diag.chance:.3f}")
            path = plots.consistency_chart(self.dir / f"consistency-round{round_}.png", diag, round_)
            self.log.image("pictures/consistency", path, step)
        if free is not None or diag is not None or ages is not None:
            self.log.event(event="diagnostics", round=round_, step=step, **metrics)

    def rounds(self, rows: list[dict], step: int) -> None:
        if not self.enabled:
            return
        from ..platform import plots
        path = plots.rounds_chart(self.dir / "rounds.png", rows)
        self.log.image("pictures/rounds", path, step)

    def summary(self, p, segment_seconds: float) -> dict:
        summary = {"rounds": p.rounds, "best_bank_knn": p.best or None,
                   "best_note": "best is picked on the test set; report final_knn as the result",
                   "last_bank_knn_top1": p.last_knn[0] if p.last_knn else None,
                   "seconds": p.seconds, "last_segment_seconds": segment_seconds, "segments": p.segments,
                   "final_knn_top1": None, "final_knn_top5": None, "code": code_version()}
        if p.rounds:
            summary.update(final_knn_top1=p.rounds[-1]["knn_top1"], final_knn_top5=p.rounds[-1]["knn_top5"])
        best = p.best.get("knn_top1") if p.best else None
        self.log.info(f"final kNN (train features, test transforms): top-1 {fmt(summary['final_knn_top1'])} "
                      f"top-5 {fmt(summary['final_knn_top5'])}; best per-epoch bank kNN top-1 {fmt(best)} "
                      "(picked on the test set)")
        self.log.event(event="final", step=p.global_step, knn_top1=summary["final_knn_top1"],
                       knn_top5=summary["final_knn_top5"])
        error = None
        if self.enabled:
            try:
                write_text(self.dir / "summary.json", json.dumps(strict(summary), indent=2, allow_nan=False))
            except WriteError as e:
                error = str(e)
        error = dist.broadcast_object(error, op="summary.json")   # every rank fails with it
        if error:
            raise SummaryFailed(error)
        return summary


def round_table(rows: list[dict]) -> str:
    lines = ["round  anchors  consistency  kNN top-1"]
    for r in rows:
        lines.append(f"{r['round']:>5}  {r['anchors']:>7}  {fmt(r['consistency'], '.4f'):>11}  {fmt(r['knn_top1']):>9}")
    return "\n".join(lines)
