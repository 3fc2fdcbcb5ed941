"""Submit a run to SLURM with submitit:

    python launch/slurm.py --config NAME [key=value ...] [--nodes N --gpus-per-node G ...]
                           [--dry-run] [--then probe] [--sweep key=v1,v2,...]

Resources default to the config's `slurm:` section; the flags win. One task per GPU (per
`--tasks-per-node` on CPU partitions); every task runs `and_dist.train` with an explicit
`run_dir` and `resume=auto`, so a requeued job (preemption, time limit: see job.py) continues the
same run. The config is resolved and frozen into the run directory at submission; mistakes in it
or in the request (unknown partition, more GPUs than a node has) are one `error:` line and exit
status 2, before anything is submitted. `--dry-run` prints the batch script and the resolved
config and submits nothing (there a missing data root or a request the cluster cannot run are
warnings). `--then probe` adds a linear-probe job that starts once pretraining succeeded;
`--sweep` submits one job array with a run (own name and run directory) per value.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import cloudpickle
import yaml
from submitit.core.utils import FailedJobError

import job as job_module            # beside this file: python puts launch/ on the path
import partition
import snapshot
from job import Stage

import and_dist
from and_dist.platform import version
from and_dist.run import rundir
from and_dist.config import ConfigError, Config, load_config, save_config, to_dict
from and_dist.platform.errors import EXIT_USER_ERROR, UserError

cloudpickle.register_pickle_by_value(job_module)   # jobs unpickle Stage without launch/ on their path

FROZEN = "submitted.yaml"           # the resolved config the job runs, in its run directory
IMAGE_PYTHON = "/opt/venv/bin/python"   # the Dockerfile's, by full path: the job's PATH may be the host's
CODE_ROOT = Path(and_dist.__file__).resolve().parent.parent   # the checkout (or install) the launcher runs
SIGNAL_DELAY_S = 120                # SIGUSR2 this long before the time limit: time to checkpoint
RESOURCES = {"nodes": int, "gpus_per_node": int, "tasks_per_node": int, "cpus_per_task": int, "mem": str,
             "partition": str, "time": int, "account": str, "qos": str, "constraint": str, "exclude": str,
             "job_name": str}


@dataclass
class Run:
    cfg: Config
    overrides: list[str]            # the user's, then the sweep's
    run_dir: Path | None = None     # chosen (and created) at submission


@dataclass
class Plan:
    runs: list[Run]
    params: dict                    # submitit's SlurmExecutor parameters
    folder: str                     # submitit's job files and logs
    probe: bool
    probe_overrides: list[str]
    python: str                     # what every task runs submitit with
    warnings: list[str] = field(default_factory=list)
    copy_code: bool = True          # copy the code for the jobs (not in a container: the image is the code)


def launch_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML path or a name in configs/")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for and_dist.train")
    res = p.add_argument_group("resources (default: the config's slurm: section)")
    for name, kind in RESOURCES.items():
        res.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                         help="minutes" if name == "time" else None)
    box = p.add_argument_group("container (enroot + pyxis; see the Dockerfile)")
    box.add_argument("--container-image", help="run every task in this image (srun --container-image)")
    box.add_argument("--container-mounts", default="", help="SRC:DST,... besides out_dir, the log folder and "
                     "data.root (mounted at the same paths)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="any other sbatch option, repeatable: --sbatch gres=gpu:a100:8 --sbatch exclusive "
                        "--sbatch reservation=r1")
    p.add_argument("--dry-run", action="store_true", help="print the batch script and config; submit nothing")
    p.add_argument("--then", choices=["probe"], help="a dependent job after pretraining succeeded")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one run per value, as one job array (repeat for a grid)")
    return p.parse_intermixed_args(argv)


def _load(config: str, overrides: list[str], dry_run: bool, warnings: list[str]) -> Config:
    """load_config; a dry run reports a data root that is missing here as a warning."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        if not (dry_run and str(e).startswith("data.root")):
            raise
        warnings.append(f"{e} (a submission would stop here)")
    return load_config(config, overrides, check_data=False)


def _sweep(specs: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> the grid of override lists; [[]] without a sweep."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values.strip(","):
            raise UserError(f"--sweep {spec!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={v}" for v in values.split(",") if v])
    return [list(combo) for combo in itertools.product(*axes)]


def _name(base: str, sweep: list[str]) -> str:
    parts = [base] + [kv.replace("=", "-") for kv in sweep]
    return "-".join(parts).replace("/", "_")


def _resource_overrides(args) -> list[str]:
    """Resource flags as `slurm.*` overrides (typed and checked by the config schema; they win)."""
    out = []
    for name, kind in RESOURCES.items():
        value = getattr(args, name)
        if value is not None:
            out.append(f"slurm.{name}={json.dumps(value)}")
    return out


def _sbatch_options(given: list[str]) -> dict:
    """--sbatch KEY=VALUE / --sbatch FLAG -> sbatch options as submitit writes them."""
    out = {}
    for item in given:
        key, eq, value = item.lstrip("-").partition("=")
        if not key:
            raise UserError(f"--sbatch {item!r}: expected KEY=VALUE or FLAG, as sbatch spells it without '--'")
        out[key.replace("-", "_")] = value if eq else True
    return out


def make_plan(args) -> Plan:
    """Everything to submit, checked: the runs (one per sweep value), sbatch parameters, folders."""
    warnings: list[str] = []
    user = list(args.overrides)
    if any(o.startswith("resume=") and o not in ("resume=", "resume=auto") for o in user):
        raise UserError("launch/slurm.py continues runs with resume=auto (and run_dir=...); "
                        "a checkpoint path in resume is not supported here")
    flags = _resource_overrides(args)
    base = _load(args.config, user + flags, args.dry_run, warnings)
    runs = [Run(base, user)]
    if args.sweep:
        if base.run_dir:
            raise UserError("run_dir=... with --sweep: every run of a sweep gets its own directory; drop run_dir")
        runs = []
        for sweep in _sweep(args.sweep):
            overrides = user + sweep + [f"name={_name(base.name, sweep)}"]
            runs.append(Run(_load(args.config, overrides + flags, args.dry_run, []), overrides))
    s = base.slurm
    if s.gpus_per_node and args.tasks_per_node not in (None, s.gpus_per_node):
        raise UserError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {s.gpus_per_node}: "
                        "runs use one task per GPU; leave --tasks-per-node out")
    tasks = s.gpus_per_node or s.tasks_per_node
    minutes = _check_cluster(s, tasks, args.dry_run, warnings)
    folder = s.folder or str(Path(base.out_dir) / base.name / "slurm")
    params = dict(job_name=s.job_name or base.name, time=minutes, nodes=s.nodes, ntasks_per_node=tasks,
                  cpus_per_task=s.cpus_per_task, gpus_per_node=s.gpus_per_node, mem=s.mem,
                  partition=s.partition, account=s.account, qos=s.qos, constraint=s.constraint,
                  exclude=s.exclude, signal_delay_s=SIGNAL_DELAY_S,
                  # srun does not take --cpus-per-task from sbatch before SLURM 23.11: say it again
                  setup=["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
                         'if [ -n "$SLURM_CPUS_PER_TASK" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi'],
                  wckey=None,                         # no workload key: sites that enforce them reject ours
                  additional_parameters={"requeue": True, **_sbatch_options(args.sbatch)})  # requeue: sites whose default is no requeue
    params = {k: v for k, v in params.items() if v not in ("", 0)}      # unset: the cluster's default
    python = shlex.quote(sys.executable)
    if args.container_image:
        params["srun_args"] = _container_args(args.container_image, args.container_mounts, base, folder)
        python = IMAGE_PYTHON
    probe = args.then == "probe"
    if probe and find_spec("and_dist.probe") is None:
        warnings.append("--then probe: and_dist.probe is not available in this installation; no probe job")
        probe = False
    probe_overrides = [o for o in user if not o.startswith(("run_dir=", "resume="))]
    return Plan(runs, params, folder, probe, probe_overrides, python, warnings, copy_code=not args.container_image)


def _container_args(image: str, extra_mounts: str, cfg: Config, folder: str) -> list[str]:
    """pyxis flags: the image, and the paths the job writes or reads mounted where they are."""
    paths = [cfg.out_dir] + [d for d in (folder, cfg.data.root) if d and not d.startswith(cfg.out_dir + "/")]
    mounts = [f"{d}:{d}" for d in dict.fromkeys(paths)] + [m for m in extra_mounts.split(",") if m]
    return [f"--container-image={image}", f"--container-mounts={','.join(mounts)}"]


def _check_cluster(s, tasks: int, dry_run: bool, warnings: list[str]) -> int:
    """Refuse what the partition can never run; returns the job's time, capped at the partition's
    limit (a longer request would pend forever; the run is requeued at the limit anyway)."""
    try:
        found = partition.query()
    except UserError:
        if not dry_run:
            raise
        found = None
    if found is None:
        if not dry_run:
            raise UserError("no SLURM here (sinfo/sbatch not found): run launch/slurm.py on a login node, "
                            "or use --dry-run")
        warnings.append("no sinfo here: partition and node sizes not checked")
        return s.time
    problems = partition.problems(found, s.partition, s.nodes, s.gpus_per_node, tasks, s.cpus_per_task)
    if problems and not dry_run:
        raise UserError("; ".join(problems))
    warnings.extend(problems)
    limit = found[s.partition].max_minutes if s.partition in found else None
    if limit is not None and s.time > limit:
        warnings.append(f"--time {s.time}: partition '{found[s.partition].name}' allows {limit} minutes; "
                        f"asking for {limit} (the run is requeued at the limit, up to slurm.max_requeues times)")
        return limit
    return s.time


# ----------------------------------------------------------------------------------- dry run

def _command(plan: Plan) -> str:
    """What submitit's SlurmExecutor runs on every task (its `_submitit_command_str`)."""
    return f"{plan.python} -u -m submitit.core._submit {shlex.quote(plan.folder)}"


def probe_params(plan: Plan, dependency: str) -> dict:
    """The probe job's: after the pretraining, and cancelled (not pending forever) if it fails."""
    extra = {**plan.params.get("additional_parameters", {}), "kill_on_invalid_dep": "yes"}
    return dict(dependency=dependency, job_name=f"{plan.params['job_name']}-probe", additional_parameters=extra)


def batch_script(plan: Plan, count: int, dependency: str | None = None) -> str:
    from submitit.slurm.slurm import _make_sbatch_string   # what SlurmExecutor writes, without a cluster
    extra = {"map_count": count} if count > 1 else {}
    if dependency:
        extra.update(probe_params(plan, dependency))
    return _make_sbatch_string(command=_command(plan), folder=plan.folder, **{**plan.params, **extra})


def show(plan: Plan) -> None:
    p, first = plan.params, plan.runs[0]
    ranks = p["nodes"] * p["ntasks_per_node"]
    per = "one per GPU" if p.get("gpus_per_node") else "CPU tasks"
    print(f"# {ranks} rank{'s' * (ranks != 1)}: {p['nodes']} node(s) x {p['ntasks_per_node']} tasks ({per}); "
          f"{len(plan.runs)} run(s); submitit folder {plan.folder}")
    for run in plan.runs:
        where = run.cfg.run_dir or f"{run.cfg.out_dir}/{run.cfg.name}/<time of submission>"
        print(f"# run {run.cfg.name}: {where}" + (f"  ({' '.join(run.overrides)})" if run.overrides else ""))
    if plan.copy_code:
        print(f"# code: a copy of {CODE_ROOT}/{{{','.join(snapshot.PARTS)}}} in {plan.folder}/code/ at submission")
    print("\n# ---- batch script" + (" (job array)" if len(plan.runs) > 1 else ""))
    print(batch_script(plan, len(plan.runs)))
    if plan.probe:
        dep = "afterok:<pretraining job>" if len(plan.runs) == 1 else "aftercorr:<pretraining array>"
        print("# ---- probe batch script (runs and_dist.probe --checkpoint RUN_DIR)")
        print(batch_script(plan, len(plan.runs), dep))
    print(f"# ---- resolved config of {first.cfg.name}")
    print(yaml.safe_dump(to_dict(first.cfg), sort_keys=False), end="")


# ----------------------------------------------------------------------------------- submit

def submit(plan: Plan) -> list:
    """Copy the code, choose and freeze every run directory, then submit; (kind, job, run_dir, after)
    per job."""
    code = {"version": json.dumps(version.code_version())}
    if plan.copy_code:
        code["code"] = str(snapshot.take(CODE_ROOT, Path(plan.folder).resolve()))
    stages = []
    for run in plan.runs:
        c = run.cfg
        run.run_dir, _ = rundir.choose(c.out_dir, c.name, c.run_dir, c.resume)
        save_config(c, run.run_dir / FROZEN)
        stages.append(Stage("train", str(run.run_dir / FROZEN), (), str(run.run_dir), c.slurm.max_requeues, **code))
    try:
        return _submit(plan, stages, code)
    except Exception:
        for run in plan.runs:          # a refused submission leaves no empty run behind
            if [p.name for p in run.run_dir.iterdir()] == [FROZEN]:
                shutil.rmtree(run.run_dir)
        raise


def _submit(plan: Plan, stages: list[Stage], code: dict) -> list:
    import submitit
    with submitit.helpers.clean_env():      # from inside an allocation its SLURM_* would leak into the job
        return _submit_jobs(submitit, plan, stages, code)


def _submit_jobs(submitit, plan: Plan, stages: list[Stage], code: dict) -> list:
    ex = submitit.SlurmExecutor(folder=plan.folder, max_num_timeout=plan.runs[0].cfg.slurm.max_requeues,
                                python=plan.python)
    ex.update_parameters(**plan.params)
    jobs = ex.submit_array(stages)
    rows = [("train", j, r.run_dir, "") for j, r in zip(jobs, plan.runs)]
    if plan.probe:
        first = jobs[0].job_id
        dep = f"afterok:{first}" if len(jobs) == 1 else f"aftercorr:{first.split('_')[0]}"
        ex.update_parameters(**probe_params(plan, dep))
        probes = [Stage("probe", "", tuple(plan.probe_overrides), str(r.run_dir), r.cfg.slurm.max_requeues, **code)
                  for r in plan.runs]
        rows += [("probe", j, r.run_dir, t.job_id) for j, r, t in zip(ex.submit_array(probes), plan.runs, jobs)]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = launch_args(argv)
    try:
        plan = make_plan(args)
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if args.dry_run:
            show(plan)
            return 0
        with contextlib.redirect_stderr(io.StringIO()):   # submitit echoes sbatch's errors; we say it once
            rows = submit(plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FailedJobError as e:     # sbatch refused the job: its reason, on one line
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: sbatch refused the job: {reason}", file=sys.stderr)
        return EXIT_USER_ERROR
    for kind, job, run, after in rows:
        print(f"submitted {kind} job {job.job_id}{f' (after {after} succeeds)' if after else ''}\n"
              f"  run directory {run}\n"
              f"  log {job.paths.stdout}\n  errors {job.paths.stderr}")
    print(f"follow with: squeue -j {rows[0][1].job_id.split('_')[0]}; tail -f {rows[0][1].paths.stdout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
