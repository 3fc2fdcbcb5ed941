"""Compare settings of the curriculum over seeds, branched from one shared start:
`python -m and_dist.compare --config X --arms and,instance --seeds 0,1,2 [--branch-after-round 0]
[--print-commands] [key=value ...]`.

For each seed s one base run trains rounds 0..B (B = --branch-after-round; the config's own
curriculum, train.seed=s) in out_dir/<name>/seed<s>/base. Every arm then starts from the base's
round-B checkpoint (`init_from`: its weights, memory bank and round) and trains the remaining
rounds up to curriculum.rounds under its own settings, in out_dir/<name>/seed<s>/<arm>: the same
budget for every arm, and the same round 0..B for all of them. The key=value overrides apply to
the base and every arm.

Arms (--arms, comma-separated): `and` (curriculum.method=and), `instance` (curriculum.method=
instance: the same budget without anchors), or `NAME:key=value[,key=value ...]`, any settings
under a name of one's own (e.g. `--arms and,k3:curriculum.neighbours=3,curriculum.anchor_rate=0.1`:
an item with `=` and no `NAME:` continues the arm before it). An arm's settings should leave the
model, its embedding and the image size alone (refused before any work).

Every base and arm is an ordinary run directory (run_dir=..., resume=auto), so running the same
command again continues what is missing: a run with a summary.json is skipped, an unfinished one
resumes from its checkpoint. A stop signal ends the run being trained after its checkpoint, and
this command exits with its status (143 for SIGTERM). When every run has finished it writes
out_dir/<name>/compare.md and compare.json (per arm and round: kNN top-1, the anchors' and all
samples' neighbourhood consistency, as mean, sample sd over seeds (none for one seed) and n) and
compare.png (kNN per round per arm, the band one sd either side of the mean).

Runs are trained one after another in this one process (a second process group in one process
hangs at its rendezvous, so a multi-rank launch is refused). For several ranks, `--print-commands`
prints each run's `python -m and_dist.train` command instead (bases first: an arm's init_from must
exist) to start under torchrun, srun or `python launch/slurm.py` with the same arguments; once
they have finished, this command (alone) skips them all and writes the table.

Exit status: 0 done; 2 a user error (one line, before any run starts); 128 + N a signal stopped a
run after its checkpoint; otherwise the failing run's status.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import MODEL_SHAPE_WORDS, load_config, model_shape, shape_differences
from .platform import files
from .platform.cluster import placement
from .platform.errors import UserError
from .platform.log import read_events
from .platform.version import describe_version
from .run.entry import main_rank, user_error_exit
from .run.stop import exits_on_stop

PRESETS = {"and": ["curriculum.method=and"], "instance": ["curriculum.method=instance"]}
COMPARED_METRICS = ("knn_top1", "anchor_consistency", "all_consistency")
OWN_KEYS = ("run_dir=", "resume=", "init_from=", "train.seed=")      # what this command sets per run


@dataclass
class Job:
    seed: int
    arm: str                 # "base" or the arm's name
    run_dir: Path
    argv: list[str]          # and_dist.train's


# ---------------------------------------------------------------------------------- planning

def split_items(text: str) -> list[str]:
    """Split at commas outside brackets (a value may be a list: data.crop_scale=[0.2,1.0])."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [i.strip() for i in items + [cur] if i.strip()]


def parse_arms(text: str) -> dict[str, list[str]]:
    """{arm name: its overrides} from the --arms syntax of the module docstring."""
    arms, last = {}, None
    for item in split_items(text):
        colon, eq = item.find(":"), item.find("=")
        if colon > 0 and (eq < 0 or colon < eq):
            last, first = item[:colon], item[colon + 1:]
            overrides = [first] if first else []
        elif eq > 0:
            if last is None or last in PRESETS:
                raise UserError(f"--arms: {item!r} follows no NAME:key=value arm (write NAME:{item})")
            arms[last].append(item)
            continue
        elif item in PRESETS:
            last, overrides = item, list(PRESETS[item])
        else:
            raise UserError(f"--arms: unknown arm {item!r}; presets are {', '.join(PRESETS)}, "
                            "or give NAME:key=value[,key=value ...]")
        if last in arms or last == "base" or "/" in last or last.startswith("."):
            raise UserError(f"--arms: arm name {last!r} is used twice or is not a plain folder name (nor 'base')")
        arms[last] = overrides
    if not arms:
        raise UserError("--arms: no arm given")
    return arms


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_items(text)]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give each seed once")
    return seeds


def plan_arms(config: str, overrides: list[str], arms: dict[str, list[str]], seeds: list[int],
         branch: int) -> tuple[Path, list[Job]]:
    """(the comparison's folder, every run in order: per seed its base, then its arms), every
    config checked first."""
    if any(o.startswith(OWN_KEYS) for o in overrides):
        raise UserError(f"compare chooses {', '.join(k.rstrip('=') for k in OWN_KEYS)} for each run; "
                        "leave them out of the overrides")
    if branch < 0:
        raise UserError(f"--branch-after-round {branch}: must be 0 or more")
    cfg = load_config(config, overrides)
    root = Path(cfg.out_dir) / cfg.name
    for name, extra in arms.items():
        arm = load_config(config, overrides + extra)
        if shape_differences(cfg, arm):
            raise UserError(f"arm {name}: {MODEL_SHAPE_WORDS} stay the base's "
                            f"({', '.join(map(str, model_shape(cfg).values()))}); the arms branch from its weights")
        if arm.curriculum.rounds <= branch + 1:
            raise UserError(f"arm {name}: curriculum.rounds={arm.curriculum.rounds} leaves nothing after the branch "
                            f"at round {branch}; use more than {branch + 1} rounds")
    jobs = []
    for s in seeds:
        base = root / f"seed{s}" / "base"
        common = ["--config", config, *overrides]
        jobs.append(Job(s, "base", base, common + [f"train.seed={s}", f"curriculum.rounds={branch + 1}",
                                                   f"run_dir={base}", "resume=auto"]))
        for name, extra in arms.items():
            run = root / f"seed{s}" / name
            jobs.append(Job(s, name, run, common + extra + [
                f"train.seed={s}", f"run_dir={run}", "resume=auto",
                f"init_from={base / 'checkpoints' / f'r{branch}-end'}"]))
    return root, jobs


def train(job: Job) -> int:
    """One run, in this process; its exit status."""
    from .train import main
    if main_rank():
        print(f"== compare: seed {job.seed}, {job.arm}: {job.run_dir}", flush=True)
    try:
        return main(job.argv)
    except SystemExit as e:          # a config mistake: train's one line is already out
        return e.code if isinstance(e.code, int) else 1


# ---------------------------------------------------------------------------------- the table

def mean_sd(values: list) -> dict:
    """Mean, sample standard deviation (n - 1; None below two values) and n of the values that
    were measured (None is left out)."""
    got = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(got) if got else None,
            "sd": statistics.stdev(got) if len(got) > 1 else None, "n": len(got)}


def _events(run: Path, kind: str) -> dict[int, dict]:
    """The last `kind` event of each round in the run's metrics.jsonl."""
    return {e["round"]: e for e in read_events(run, kind)}


def run_rounds(base: Path, arm: Path, branch: int) -> dict[int, dict]:
    """{round: {metric: value}} of one arm and seed: kNN from the arm's summary (it carries the
    base's rounds), consistency from the discovery diagnostics of whichever run discovered."""
    rows = json.loads((arm / "summary.json").read_text())["rounds"]
    diag = {**{r: e for r, e in _events(base, "diagnostics").items() if r <= branch},
            **{r: e for r, e in _events(arm, "diagnostics").items() if r > branch}}
    return {r["round"]: {"knn_top1": r["knn_top1"],
                         "anchor_consistency": diag.get(r["round"], {}).get("anchor_consistency"),
                         "all_consistency": diag.get(r["round"], {}).get("all_consistency")} for r in rows}


def arm_table(per_seed: dict[str, list[dict[int, dict]]]) -> list[dict]:
    """Rows (arm, round, each metric's mean_sd over seeds) from {arm: [run_rounds per seed]}."""
    rows = []
    for arm, runs in per_seed.items():
        for r in sorted({r for run in runs for r in run}):
            rows.append({"arm": arm, "round": r, **{m: mean_sd([run.get(r, {}).get(m) for run in runs])
                                                    for m in COMPARED_METRICS}})
    return rows


def _cell(s: dict, spec: str) -> str:
    if s["mean"] is None:
        return "-"
    return format(s["mean"], spec) + (f" ± {format(s['sd'], spec)}" if s["sd"] is not None else "") + f" (n={s['n']})"


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "Mean ± sample sd over seeds (n seeds measured); consistency: share of "
             "anchor-neighbour pairs (anchors) / of all samples' neighbours with the same true label, at the "
             "round's discovery.", "",
             "| round | arm | kNN top-1 (%) | anchors' consistency | all samples' consistency |",
             "| ---: | --- | --- | --- | --- |"]
    order = {arm: i for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows))}
    for row in sorted(rows, key=lambda r: (r["round"], order[r["arm"]])):
        lines.append(f"| {row['round']} | {row['arm']} | {_cell(row['knn_top1'], '.2f')} | "
                     f"{_cell(row['anchor_consistency'], '.3f')} | {_cell(row['all_consistency'], '.3f')} |")
    return "\n".join(lines) + "\n"


def run_code(run: Path) -> dict | None:
    """The code version that finished the run (its summary.json; None for a run from before it was recorded)."""
    return json.loads((run / "summary.json").read_text()).get("code")


def code_lines(runs: list[dict]) -> str:
    """The code the runs were made with: one line when they agree, else one per version with
    its runs, so a table mixing code versions says so."""
    versions: dict[str, list[str]] = {}
    for r in runs:
        text = describe_version(r["code"]) if r["code"] else "not recorded"
        versions.setdefault(text, []).append(f"seed{r['seed']}/{r['arm']}")
    if len(versions) == 1:
        return f"\nCode: {next(iter(versions))} (every run).\n"
    return "\nCode differs between runs:\n" + "".join(f"- {v}: {', '.join(names)}\n" for v, names in versions.items())


def write_table(root: Path, arms: list[str], seeds: list[int], branch: int, jobs: list[Job]) -> list[dict]:
    from .platform.plots import compare_chart
    per_seed = {a: [run_rounds(root / f"seed{s}" / "base", root / f"seed{s}" / a, branch) for s in seeds]
                for a in arms}
    rows = arm_table(per_seed)
    title = f"{root.name}: {', '.join(arms)} over seeds {', '.join(map(str, seeds))}, branched after round {branch}"
    runs = [{"seed": j.seed, "arm": j.arm, "run_dir": str(j.run_dir), "code": run_code(j.run_dir)} for j in jobs]
    files.write_text(root / "compare.md", markdown(rows, title) + code_lines(runs))
    files.write_text(root / "compare.json", json.dumps(
        {"title": title, "arms": arms, "seeds": seeds, "branch_after_round": branch, "rows": rows,
         "runs": runs}, indent=1))
    series = {a: [{"round": r["round"], "knn_top1": r["knn_top1"]["mean"], "knn_top1_sd": r["knn_top1"]["sd"],
                   "consistency": r["anchor_consistency"]["mean"], "all_consistency": r["all_consistency"]["mean"]}
                  for r in rows if r["arm"] == a] for a in arms}
    compare_chart(root / "compare.png", series)
    return rows


# ---------------------------------------------------------------------------------- entry

def _refuse_ranks():
    raise UserError("compare trains its runs one after another in one process: start it alone, or start each "
                    "command of --print-commands under torchrun / srun / launch/slurm.py, then this command alone")


@exits_on_stop("run the same command again to continue")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m and_dist.compare", description=__doc__.split("\n\n")[0],
                                epilog="Arms: and, instance, or NAME:key=value[,key=value ...]. "
                                "See the module docstring (and docs/compare.md).")
    p.add_argument("--config", default="demo", help="YAML path or a name in configs/ (default: demo)")
    p.add_argument("--arms", default="and,instance", help="comma-separated arms (default: and,instance)")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values (default: 0)")
    p.add_argument("--branch-after-round", type=int, default=0, help="the arms start after this round (default 0)")
    p.add_argument("--print-commands", action="store_true", help="print each run's train command, run nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    arms = user_error_exit(parse_arms, args.arms)
    seeds = user_error_exit(parse_seeds, args.seeds)
    root, jobs = user_error_exit(plan_arms, args.config, args.overrides, arms, seeds, args.branch_after_round)
    if placement().world > 1 and not args.print_commands:
        user_error_exit(_refuse_ranks)
    if args.print_commands:
        for job in jobs:
            print(f"python -m and_dist.train {shlex.join(job.argv)}")
        return 0
    for job in jobs:
        if (job.run_dir / "summary.json").exists():
            if main_rank():
                print(f"== compare: seed {job.seed}, {job.arm}: finished, skipped ({job.run_dir})", flush=True)
            continue
        status = train(job)
        if status != 0:
            if main_rank():
                print(f"compare: seed {job.seed}, {job.arm} ended with exit status {status}; run the same "
                      "command again to continue", file=sys.stderr)
            return status
    if main_rank():
        write_table(root, list(arms), seeds, args.branch_after_round, jobs)
        print((root / "compare.md").read_text() + f"({root / 'compare.md'}, compare.json, compare.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
