"""How the label-free neighbourhood measures track the labelled consistency (issue 34 item 3):
`python tools/label_free_tracking.py RUN...` reads each run's `diagnostics` events.

Units: one (run, discovery, entropy decile), with the decile's mean consistency and its mean
mutual_rate, view_agreement (on the view sample) and round_stability. Printed: the Spearman rank
correlation of each measure with the consistency over all units (with n and its p-value), and
within each discovery (10 deciles) the median over discoveries. Per sample, where the
neighbourhoods' files carry the class (an ImageFolder tree: the parent folder), the consistency
of samples that pass each flag against those that do not.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from and_dist.platform.log import read_events

MEASURES = ("mutual_rate", "view_agreement", "round_stability")


def units(run: Path) -> list[dict]:
    out = []
    for e in read_events(run, "diagnostics"):
        if e.get("decile1_consistency") is None:
            continue
        for d in range(1, 11):
            out.append({"run": run.name, "round": e["round"], "consistency": e[f"decile{d}_consistency"],
                        **{m: e.get(f"decile{d}_{m}") for m in MEASURES}})
    return out


def per_sample(run: Path) -> dict:
    """Consistency (k=1: same class as the nearest neighbour) of flagged vs unflagged samples."""
    rows = {m: [[0, 0], [0, 0]] for m in MEASURES}            # measure -> [[same, count] of flag 0, of flag 1]
    for path in sorted((run / "neighbourhoods").glob("round*.npz")):
        z = np.load(path)
        if "files" not in z:
            return {}
        cls = np.array([os.path.basename(os.path.dirname(f)) for f in z["files"]])
        same = cls[z["neighbours"][:, 0]] == cls
        for m in MEASURES:
            v = z[m]
            for flag in (0, 1):
                sel = np.isfinite(v) & ((v >= 0.5) if flag else (v < 0.5))
                rows[m][flag][0] += int(same[sel].sum())
                rows[m][flag][1] += int(sel.sum())
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    args = ap.parse_args(argv)
    all_units = [u for r in args.runs for u in units(Path(r))]
    print(f"{len(all_units)} (run, discovery, decile) units from {len(args.runs)} run(s)")
    for m in MEASURES:
        pairs = [(u[m], u["consistency"]) for u in all_units if u[m] is not None and u["consistency"] is not None]
        if len(pairs) < 3 or len({a for a, _ in pairs}) == 1:
            print(f"{m}: no rank correlation: {len(pairs)} units" + (f", all {pairs[0][0]:.3f}" if pairs else ""))
            continue
        rho, p = spearmanr(*zip(*pairs))
        within = []
        for key in sorted({(u["run"], u["round"]) for u in all_units}):
            grp = [(u[m], u["consistency"]) for u in all_units if (u["run"], u["round"]) == key and u[m] is not None]
            if len(grp) >= 3 and len({a for a, _ in grp}) > 1:
                within.append(spearmanr(*zip(*grp))[0])
        print(f"{m}: Spearman {rho:+.2f} (n={len(pairs)}, p={p:.2g}) across deciles and discoveries; within a "
              f"discovery median {np.median(within) if within else float('nan'):+.2f} over {len(within)} discoveries (n=10 each)")
    for r in args.runs:
        rows = per_sample(Path(r))
        for m, ((s0, n0), (s1, n1)) in rows.items():
            if n0 and n1:
                print(f"{Path(r).name} {m}: neighbour of the same class {s1 / n1:.3f} when flagged (n={n1}) vs "
                      f"{s0 / n0:.3f} when not (n={n0})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
