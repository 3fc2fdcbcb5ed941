"""The run's pictures, as PNG files a person reads at a glance: the anchors AND picked with the
neighbours it found for them, the entropy histogram with the anchor cut-off, per-round progress,
probe accuracies, and several runs side by side.

Figures are drawn on matplotlib's Agg canvas directly (never through pyplot), so drawing neither
switches a global backend nor keeps figures alive. Every file is written under a temporary name
and renamed, so a reader never sees half a picture; a picture that cannot be written is a
warning on stderr, never a failed run.
"""
from __future__ import annotations

import io
import math
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from . import files

DPI = 100
TILE = 64                  # thumbnails are upscaled (nearest neighbour) to TILE x TILE pixels
BORDER = 4                 # frame width around each thumbnail
FRAME = TILE + 2 * BORDER
GAP = 6                    # between frames
ANCHOR_GAP = 18            # extra space between an anchor and its neighbours
LEFT, RIGHT, TOP, BOTTOM = 110, 12, 96, 12
MIN_WIDTH = 520            # room for the title when k is small
MAX_NEIGHBOURS = 10        # columns shown when k is large
SAME = (0, 170, 0)         # neighbour has the anchor's true label
OTHER = (220, 0, 0)        # it has not
ANCHOR = (60, 60, 60)
MUTUAL = (0, 90, 210)      # without labels: the anchor and its first neighbour are each other's nearest
PLAIN = (175, 175, 175)    # without labels: any other neighbour


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path | None:
    """Write the picture durably; a failed write is a warning (None), never a lost run."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes(path, _png(fig))
    except OSError as e:
        print(f"warning: picture not saved: {e if isinstance(e, files.WriteError) else files.WriteError(path, e)}",
              file=sys.stderr)
        return None
    return path


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def grid_size(rows: int, cols: int) -> tuple[int, int, int]:
    """(width, height, x0) in pixels of an anchor grid of `rows` anchors and `cols` columns
    (anchor + neighbours); x0 is where the grid starts, centred when the title is wider."""
    grid_w = cols * FRAME + (cols - 1) * GAP + ANCHOR_GAP
    width = max(MIN_WIDTH, LEFT + grid_w + RIGHT)
    x0 = LEFT + (width - LEFT - RIGHT - grid_w) // 2
    return width, TOP + rows * FRAME + (rows - 1) * GAP + BOTTOM, x0


def tile_box(row: int, col: int, rows: int, cols: int) -> tuple[int, int]:
    """(top, left) pixel of the frame of tile (row, col) in the saved anchor grid; col 0 is the anchor."""
    x0 = grid_size(rows, cols)[2]
    left = x0 + col * (FRAME + GAP) + (ANCHOR_GAP if col else 0)
    return TOP + row * (FRAME + GAP), left


def _thumbnail(picture: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(picture).resize((TILE, TILE), Image.NEAREST))


def _pick_anchors(entropy: torch.Tensor, anchor: torch.Tensor, rows: int) -> torch.Tensor:
    """Up to `rows` anchors spread evenly over their entropy ranking: lowest first, the one at
    the cut-off last."""
    idx = anchor.nonzero()[:, 0]
    idx = idx[torch.sort(entropy[idx], stable=True).indices]
    at = torch.linspace(0, len(idx) - 1, min(rows, len(idx))).round().long().unique()
    return idx[at]


def anchor_grid(path: Path, entropy: torch.Tensor, neighbours: torch.Tensor, anchor: torch.Tensor,
                labels: torch.Tensor | None, pictures: Callable[[torch.Tensor], torch.Tensor], round_: int,
                rows: int = 8) -> Path | None:
    """Anchors (one per row, spread over the entropy ranking) each followed by its discovered
    neighbours, framed green when a neighbour shares the anchor's true label and red when not.
    The labels only colour the picture; without them (None) the first neighbour is framed blue
    when it is mutual. None when there are no anchors."""
    if anchor is None or not anchor.any():
        return None
    labelled = labels is not None
    entropy, neighbours, anchor = (t.cpu() for t in (entropy, neighbours, anchor))
    chosen = _pick_anchors(entropy, anchor, rows)
    k = min(neighbours.shape[1], MAX_NEIGHBOURS)
    nbrs = neighbours[chosen, :k]
    images = pictures(torch.cat([chosen[:, None], nbrs], 1).flatten()).cpu().numpy()
    n_rows, cols = len(chosen), k + 1
    width, height, x0 = grid_size(n_rows, cols)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    if labelled:
        labels = labels.cpu()
        frames = torch.where(labels[nbrs] == labels[chosen][:, None], 1, 2)
    else:          # no labels: what can be seen without them, whether the first neighbour is mutual
        frames = torch.full(nbrs.shape, 3)
        frames[:, 0] = torch.where(neighbours[nbrs[:, 0], 0] == chosen, 4, 3)
    for r in range(n_rows):
        for c in range(cols):
            top, left = tile_box(r, c, n_rows, cols)
            colour = ANCHOR if c == 0 else (None, SAME, OTHER, PLAIN, MUTUAL)[frames[r, c - 1]]
            canvas[top: top + FRAME, left: left + FRAME] = colour
            canvas[top + BORDER: top + BORDER + TILE, left + BORDER: left + BORDER + TILE] = \
                _thumbnail(images[r * cols + c])
    fig = _figure(width / DPI, height / DPI)
    fig.figimage(canvas, 0, 0, origin="upper")

    def text(x, y, s, **kw):           # pixel coordinates, y from the top
        fig.text(x / width, 1 - y / height, s, **kw)

    n, m = len(entropy), int(anchor.sum())
    cut = entropy[anchor].max().item()
    text(width / 2, 8, f"Round {round_}: anchors and their discovered neighbours",
         ha="center", va="top", fontsize=12, weight="bold")
    shown = f"first {k} of {neighbours.shape[1]} neighbours" if k < neighbours.shape[1] else \
        f"{k} neighbour{'s' * (k > 1)}"
    border = ("Border: green = same true label as the anchor, red = different (labels used for this picture "
              "only)." if labelled else "No labels. Border of nbr 1: blue = the anchor is its nearest neighbour "
              "too (mutual), grey = not.")
    note = (f"{m} anchors of {n} samples (entropy <= {cut:.3f}); {n_rows} shown, lowest entropy on top; "
            f"{shown} per anchor. {border}")
    text(width / 2, 28, "\n".join(textwrap.wrap(note, int((width - 30) / 6.2))),
         ha="center", va="top", fontsize=8, color="0.25")
    for c in range(cols):
        left = tile_box(0, c, n_rows, cols)[1]
        text(left + FRAME / 2, TOP - 4, "anchor" if c == 0 else f"nbr {c}", ha="center", va="bottom",
             fontsize=8)
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.sort(entropy, stable=True).indices] = torch.arange(1, n + 1)
    for r, i in enumerate(chosen.tolist()):
        top = tile_box(r, 0, n_rows, cols)[0]
        text(x0 - 8, top + FRAME / 2, f"H {entropy[i].item():.3f}\nrank {rank[i].item()} of {n}",
             ha="right", va="center", fontsize=8)
    return _save(fig, path)


def entropy_histogram(path: Path, entropy: torch.Tensor, anchor: torch.Tensor | None, round_: int) -> Path | None:
    """Histogram of the bank's entropies, anchors stacked apart, with the cut-off line and the
    anchor share."""
    e = entropy.detach().double().cpu().numpy()
    a = np.zeros(len(e), bool) if anchor is None else anchor.cpu().numpy().astype(bool)
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(e[np.isfinite(e)], bins=50)
    ax.hist([e[a], e[~a]], bins=bins, stacked=True, color=["tab:orange", "tab:blue"],
            label=["anchors", "other samples"])
    box = dict(boxstyle="round", facecolor="white", edgecolor="0.7")
    if a.any():
        cut = e[a].max()
        ax.axvline(cut, color="black", linestyle="--", linewidth=1.2, label=f"anchor cut-off {cut:.3f}")
        share = f"anchors: {100 * a.mean():.1f}%\n({a.sum()} of {len(e)} samples)"
    else:
        share = "no anchors this round"
    ax.text(0.98, 0.96, share, transform=ax.transAxes, ha="right", va="top", fontsize=9, bbox=box)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)           # headroom for the legend and the share
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Round {round_}: entropy of each sample's similarity softmax over the bank")
    ax.set_xlabel(f"entropy (nats; uniform over the bank = {math.log(len(e)):.2f})")
    ax.set_ylabel("samples")
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _values(rows: list[dict], key: str, scale: float = 1.0) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else scale * r[key] for r in rows], dtype=float)


def _label_points(ax, x, y, fmt: str) -> None:
    if len(x) <= 12:
        for xi, yi in zip(x, y):
            if np.isfinite(yi):
                ax.annotate(format(yi, fmt), (xi, yi), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=8)


def _round_axis(ax, rounds) -> None:
    """Whole round numbers on the x axis, every one of them while there are few."""
    rounds = sorted(set(rounds))
    ax.set_xlabel("round")
    if rounds and len(rounds) <= 20:
        ax.set_xticks(rounds)
        ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def rounds_chart(path: Path, rows: list[dict]) -> Path | None:
    """Per round: kNN accuracy (left) and neighbourhood consistency with the anchor count (right)."""
    x = np.array([r["round"] for r in rows])
    fig = _figure(10, 4)
    knn = fig.add_subplot(1, 2, 1)
    cons = fig.add_subplot(1, 2, 2, sharex=knn)
    top1 = _values(rows, "knn_top1")
    knn.plot(x, top1, "o-", color="tab:blue", label="top-1")
    knn.plot(x, _values(rows, "knn_top5"), "s--", color="tab:blue", alpha=0.5, label="top-5")
    _label_points(knn, x, top1, ".1f")
    knn.margins(y=0.2)
    knn.set_title("kNN accuracy on the test set")
    knn.set_ylabel("accuracy (%)")
    knn.legend(fontsize=9)
    c = _values(rows, "consistency", 100.0)
    cons.plot(x, c, "o-", color="tab:green")
    if len(x) <= 12:
        for xi, ci, r in zip(x, c, rows):
            if np.isfinite(ci):
                cons.annotate(f"{ci:.1f}\n{r['anchors']} anchors", (xi, ci), textcoords="offset points",
                              xytext=(0, 6), ha="center", fontsize=7)
    if not np.isfinite(c).any():
        cons.text(0.5, 0.5, "no anchors yet", transform=cons.transAxes, ha="center", color="0.4")
    cons.set_ylim(0, 110)
    cons.set_title("Neighbourhood consistency")
    cons.set_ylabel("anchor-neighbour pairs, same label (%)")
    for ax in (knn, cons):
        _round_axis(ax, x.tolist())
        ax.grid(alpha=0.3)
    fig.suptitle("Progress per round")
    fig.tight_layout()
    return _save(fig, path)


def probe_chart(path: Path, top1_by_layer: dict[str, float], knn: float | None, title: str) -> Path | None:
    """Top-1 of a probe on each layer, in the given order, and the kNN top-1 when given."""
    names, values = list(top1_by_layer), [float(v) for v in top1_by_layer.values()]
    colours = ["tab:blue"] * len(names)
    if knn is not None:
        names, values, colours = names + ["kNN"], values + [float(knn)], colours + ["tab:orange"]
    fig = _figure(max(5, 1 + 0.9 * len(names)), 4)
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=9, padding=2)
    ax.set_ylim(0, max(values + [1.0]) * 1.15)
    ax.set_title(title)
    ax.set_xlabel("probed layer" + (" (and kNN on the embedding)" if knn is not None else ""))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def compare_chart(path: Path, series: dict[str, list[dict]]) -> Path | None:
    """kNN top-1 per round of several runs, one line each, for comparing configurations (with a band
    one sd either side where the rows carry `knn_top1_sd`: a mean over seeds); beside it,
    when the runs measured it, neighbourhood consistency: the anchors' (solid) and all samples'
    (dotted, from the diagnostic), with chance level."""
    has = lambda key: any(r.get(key) is not None for rows in series.values() for r in rows)
    two = has("consistency") or has("all_consistency")
    fig = _figure(13 if two else 8, 4.5)
    ax = fig.add_subplot(1, 2 if two else 1, 1)
    cons = fig.add_subplot(1, 2, 2, sharex=ax) if two else None
    rounds = [r["round"] for rows in series.values() for r in rows]
    for n, (label, rows) in enumerate(series.items()):     # markers tell overlapping lines apart
        x = [r["round"] for r in rows]
        style = dict(marker="os^Dv"[n % 5], markersize=9 - 2.5 * (n % 3), color=f"C{n % 10}")
        ax.plot(x, _values(rows, "knn_top1"), linestyle=("-", "--", ":", "-.")[n % 4], label=label, **style)
        sd = _values(rows, "knn_top1_sd")
        if np.isfinite(sd).any():
            mean = _values(rows, "knn_top1")
            ax.fill_between(x, mean - sd, mean + sd, color=style["color"], alpha=0.15, linewidth=0)
        if cons is not None:
            if np.isfinite(_values(rows, "consistency")).any():
                cons.plot(x, _values(rows, "consistency", 100.0), linestyle="-", label=f"{label}: anchors", **style)
            if np.isfinite(_values(rows, "all_consistency")).any():
                cons.plot(x, _values(rows, "all_consistency", 100.0), linestyle=":", markerfacecolor="none",
                          label=f"{label}: all samples", **style)
    ax.set_title("kNN top-1 per round")
    ax.set_ylabel("kNN top-1 on the test set (%)")
    ax.legend(fontsize=8)
    if cons is not None:
        chance = [r["chance_consistency"] for rows in series.values() for r in rows
                  if r.get("chance_consistency") is not None]
        if chance:
            cons.axhline(100 * chance[0], color="0.4", linestyle="--", linewidth=1, label=f"chance {100 * chance[0]:.1f}")
        cons.set_ylim(0, max(50.0, cons.get_ylim()[1]))
        cons.set_title("Neighbourhood consistency at each discovery")
        cons.set_ylabel("neighbours with the same true label (%)")
        cons.legend(fontsize=8)
    for a in (ax, cons) if cons is not None else (ax,):
        _round_axis(a, rounds)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def label_free_chart(path: Path, metrics: dict, round_: int) -> Path | None:
    """The label-free measures by entropy decile (lowest entropy left), one group of bars per
    decile, with each measure's anchors and rest in the legend: the picture beside the
    consistency chart, and the only one of the two without labels."""
    from ..method.label_free import MEASURES
    names = [m for m in MEASURES if metrics.get(m) is not None]
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    x = np.arange(1, 11)
    width = 0.8 / max(1, len(names))
    colours = {"mutual_rate": "tab:blue", "view_agreement": "tab:orange", "round_stability": "tab:green"}
    for j, name in enumerate(names):
        y = np.array([np.nan if metrics.get(f"decile{d}_{name}") is None else 100 * metrics[f"decile{d}_{name}"]
                      for d in x])
        extra = f", sample {metrics.get('view_sample')}" if name == "view_agreement" else ""
        label = (f"{name}: all {100 * metrics[name]:.1f}%, anchors {_pct(metrics.get(f'anchor_{name}'))}, "
                 f"rest {_pct(metrics.get(f'rest_{name}'))}{extra}")
        ax.bar(x - 0.4 + width * (j + 0.5), y, width, color=colours[name], label=label)
    if not names:
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_xticks(x)
    ax.set_ylim(0, 130)                    # room for the legend above full bars
    ax.set_title(f"Round {round_}: neighbourhood quality without labels, by entropy decile")
    ax.set_xlabel("entropy decile (1 = lowest entropy)")
    ax.set_ylabel("samples (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def consistency_chart(path: Path, diag, round_: int) -> Path | None:
    """AND's argument on the user's data: neighbourhood class-consistency against entropy rank
    (lowest entropy left), per decile and as a running mean, with the round's anchor cut-off."""
    ranked = diag.per_sample[diag.order].numpy()
    n = len(ranked)
    ranks = np.arange(1, n + 1)
    window = max(1, n // 50)
    ok = np.isfinite(ranked)
    sums = np.concatenate([[0], np.cumsum(np.where(ok, ranked, 0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    lo = np.clip(ranks - 1 - window // 2, 0, n)
    hi = np.clip(lo + window, 0, n)
    smooth = (sums[hi] - sums[lo]) / np.maximum(counts[hi] - counts[lo], 1)
    shown = np.unique(np.linspace(0, n - 1, min(n, 2000)).round().astype(int))   # a line, not a million points
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    ax.plot(ranks[shown], 100 * smooth[shown], color="tab:blue", linewidth=1, alpha=0.6,
            label=f"running mean over {window} samples")
    edges = [b * n // len(diag.deciles) for b in range(len(diag.deciles) + 1)]
    for b, (lo, hi, v) in enumerate(zip(edges, edges[1:], diag.deciles)):
        if v is not None:
            ax.hlines(100 * v, lo + 1, hi, color="tab:blue", linewidth=3, label="entropy decile" if b == 0 else None)
            ax.annotate(f"{100 * v:.0f}", ((lo + hi) / 2, 100 * v), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=8)
    ax.axhline(100 * diag.chance, color="0.4", linestyle=":", linewidth=1.2,
               label=f"chance (same label at random) {100 * diag.chance:.1f}")
    if diag.count:
        ax.axvline(diag.count + 0.5, color="black", linestyle="--", linewidth=1.2,
                   label=f"anchor cut-off: {diag.count} anchors")
    text = "no anchors this round" if diag.anchors is None else f"anchors: {100 * diag.anchors:.1f}%"
    if diag.rest is not None and diag.anchors is not None:
        text += f"\nthe rest: {100 * diag.rest:.1f}%"
    text += f"\nall samples: {100 * diag.all:.1f}%" if diag.all is not None else ""
    ax.text(0.98, 0.96, text, transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.7"))
    ax.set_xlim(0.5, n + 0.5)
    ax.set_ylim(0, 105)
    ax.set_title(f"Round {round_}: neighbourhood class-consistency by entropy rank")
    ax.set_xlabel(f"entropy rank (1 = lowest entropy, of {n} samples)")
    ax.set_ylabel("neighbours with the sample's label (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.text(0.01, 0.01, "labels used for this picture only", fontsize=7, color="0.4")
    fig.tight_layout()
    return _save(fig, path)
