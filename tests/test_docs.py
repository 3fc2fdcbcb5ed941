"""Every shell command in README.md and docs/*.md is checked against the real entry points.

What is read: fenced blocks whose info string is ```bash, ```sh, ```shell or ```console (in a
console block only `$ `-prompted lines are commands, the rest is output). Lines ending in `\\`
continue; `#` starts a comment (a whole line or after a command); a leading `$ ` prompt is
stripped; `&&`, `||`, `;` and `|` separate commands; leading `VAR=value` assignments, redirects
and `$(...)` substitutions are set aside; `[...]` marks an optional part of a usage line (its
contents are checked as if given) and `...` stands for "more arguments".

What is checked, for each command that names one of this project's entry points:

* `python -m and_dist.X ...` (`python`, `python3`, `.venv/bin/python`): the module exists and
  its real argument parser accepts the flags. The parser is the one the entry point builds: its
  main() is called with ArgumentParser.parse_args / parse_intermixed_args patched to hand back
  the parsed namespace and stop there, so nothing runs. Then the `key=value` overrides and the
  `--config` go through the real config loading (and_dist.config.load_config with
  check_data=False, so data roots need not exist here): for train the named config (default
  demo), and a data.root must be given where the config's source needs one; for evaluate and
  probe, which start from a run's own config, the schema's defaults stand in for it (through
  evaluate.evaluation_config itself, which probe.py shares).
* `torchrun ...` and `python -m torch.distributed.run ...`: torchrun's own flags through
  torch's parser, then the module or script it starts, as above.
* `python launch/slurm.py ...`: its parser, then launch/slurm.py's own make_plan (config,
  overrides, resource flags, sweeps, the resume rule) as a dry run with no cluster query; a
  command that would submit (no `--dry-run`) must also name a data.root where one is needed.
* `python tools/X.py`, `python benchmarks/X.py`, any `python some/file.py`: the file exists; a
  script with an argparse parser has its flags checked the same way (run with runpy up to its
  parse, nothing after); tools/docs.py takes nothing or `--write FILE...`.
* `make TARGET`: the target exists in the Makefile.

Placeholders: a token that is ALL-CAPS (letters, digits, `_`, optionally an extension: RUN,
OUT.pth, RUN_DIR, N), contains `<` and `>`, starts with `/data/`, `/path/`, `~/` or `$`, or is a
path with such a component (RUN/checkpoints/r4-end). A placeholder path is not looked for;
`key=PLACEHOLDER` checks the key only (a text key keeps the placeholder as its value, `resume`
gets an existing path); a placeholder flag value of an int, float or choices flag is replaced by
a valid one; `--config PLACEHOLDER` validates against the defaults.

Links: every markdown link or image with a relative target exists relative to the page's folder;
an `#anchor` into a markdown page (or the page itself) names one of its headings (GitHub's
slugs). Inline-code paths under and_dist/, configs/, benchmarks/, tools/, launch/, docs/,
tests/ or .ci/ exist in the repository (globs must match something), placeholders aside.

Demo blocks: a block opened with ```bash demo is run, each command in order with bash from the
repository root, with PYTHONPATH=the repo, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=1, the
venv's bin/ first on PATH (so `python` and `torchrun` are this venv's) and HOME a fresh temporary
folder (so the default out_dir, ~/and_dist_runs, lands there, nothing is written into the repo,
and a later command's `~/and_dist_runs/...` finds what an earlier one wrote; nothing is appended
to the commands); each must exit 0 within DEMO_TIMEOUT_S. Keep them tiny: CI runs them.

AND_DOCS_ROOT=DIR checks DIR/README.md and DIR/docs/*.md instead (a draft, a scratch copy); the
code checked against stays this repository's.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from unittest import mock

import pytest
from helpers import ENV, REPO

from and_dist.config import Config, load_config
from and_dist.data import check_root
from and_dist.platform.errors import UserError

DOCS_ROOT = Path(os.environ.get("AND_DOCS_ROOT", REPO)).resolve()
SHELLS = {"bash", "sh", "shell", "console"}
DEMO_TIMEOUT_S = 900
REPO_DIRS = ("and_dist", "configs", "benchmarks", "tools", "launch", "docs", "tests", ".ci")


def documents(root: Path = DOCS_ROOT) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def rel(path: Path) -> str:
    for base in (DOCS_ROOT, REPO):
        with contextlib.suppress(ValueError):
            return str(path.relative_to(base))
    return str(path)


# ------------------------------------------------------------------------------- placeholders

ALL_CAPS = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Za-z0-9]+)*")


def is_placeholder(token: str) -> bool:
    if not token:
        return False
    if "<" in token and ">" in token:
        return True
    if token.startswith(("/data/", "/path/", "~/", "$")):
        return True
    if ALL_CAPS.fullmatch(token):
        return True
    key, sep, _ = token.partition("=")
    if sep and ALL_CAPS.fullmatch(key):          # KEY=VALUE
        return True
    return "/" in token and any(is_placeholder(part) for part in token.split("/") if part)


# ------------------------------------------------------------------------ reading the markdown

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


@dataclass
class Block:
    doc: Path
    line: int                      # the opening fence's line (1-based)
    lang: str
    demo: bool
    lines: list[tuple[int, str]]   # (line number, text) of the block's content


@dataclass
class Command:
    doc: Path
    line: int
    text: str                      # this command, as written (one of a line's `&&` parts)
    argv: list[str]                # its words, placeholders and all, usage brackets undone
    problems: list[str] = field(default_factory=list)   # found while reading it

    def where(self) -> str:
        return f"{rel(self.doc)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """Every fenced block of `doc`, with its language and whether it is marked `demo`."""
    out, current, fence = [], None, ""
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if current is None:
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
                words = m.group(2).split()
                lang = words[0].lower().strip("{}.") if words else ""
                current, fence = Block(doc, n, lang, len(words) > 1 and words[1] == "demo", []), m.group(1)
            continue
        if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not m.group(2).strip():
            out.append(current)
            current = None
            continue
        current.lines.append((n, line))
    return out


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(first line, text) of each command line: prompts stripped, continuations joined,
    comment lines and (in console blocks) output lines left out."""
    out, pending, start = [], None, 0
    for n, raw in block.lines:
        line = raw.strip()
        if pending is None:
            prompted = line.startswith("$ ") or line == "$"
            if block.lang == "console" and not prompted:
                continue
            line = line[1:].strip() if prompted else line
            if not line or line.startswith("#"):
                continue
            start, pending = n, ""
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append((start, pending + line))
        pending = None
    if pending:
        out.append((start, pending))
    return out


SUBST = re.compile(r"\$\([^()]*\)|`[^`]*`")


def split_commands(text: str) -> list[str]:
    """`text` cut at unquoted &&, ||, ;, | and & (not inside redirects like 2>&1), up to an
    unquoted `#` that starts a word (the rest is a comment)."""
    while SUBST.search(text):
        text = SUBST.sub("$SUBST", text)
    parts, cur, quote, i = [], [], None, 0
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c == "\\" and i + 1 < len(text):
            cur += [c, text[i + 1]]
            i += 1
        elif c == "#" and (not cur or cur[-1].isspace()):
            break
        elif c in ";|&" and not (c == "&" and ((cur and cur[-1] == ">") or text[i + 1:i + 2] == ">")):
            parts.append("".join(cur))
            cur = []
            if text[i + 1:i + 2] == c:
                i += 1
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


REDIRECT = re.compile(r"^(\d*|&)(>>?|<)(&\d+)?")


def words(text: str) -> list[str]:
    """The command's words: redirects dropped, usage brackets `[--flag VALUE]` undone, `...` left out."""
    argv, skip = [], False
    for tok in shlex.split(text):
        if skip:
            skip = False
            continue
        m = REDIRECT.match(tok)
        if m and not ("<" in tok and ">" in tok and tok.startswith("<")):   # <placeholder> is a word
            skip = m.end() == len(tok) and not m.group(3)                    # `> file`: the file too
            continue
        while tok.startswith("["):
            tok = tok[1:]
        excess = tok.count("]") - tok.count("[")
        while excess > 0 and tok.endswith("]"):
            tok, excess = tok[:-1], excess - 1
        if tok in ("", "...", "…"):
            continue
        argv.append(tok)
    return argv


def commands(doc: Path) -> list[Command]:
    out = []
    for block in blocks(doc):
        if block.lang not in SHELLS:
            continue
        for n, text in logical_lines(block):
            for part in split_commands(text):
                try:
                    out.append(Command(doc, n, part, words(part)))
                except ValueError as e:
                    out.append(Command(doc, n, part, [], [f"cannot split into words: {e}"]))
    return out


# ----------------------------------------------------------------- running the real parsers

class Parsed(BaseException):
    """Raised by the patched parse_args: the entry point's namespace, nothing run after it."""

    def __init__(self, namespace):
        super().__init__()
        self.namespace = namespace


class ArgError(BaseException):
    pass


@contextlib.contextmanager
def stop_at_parse():
    orig = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stopping(name):
        def parse(self, args=None, namespace=None):
            raise Parsed(orig[name](self, args, namespace))
        return parse

    def error(self, message):
        raise ArgError(f"{self.prog}: {message}")

    with contextlib.ExitStack() as stack:
        for name in orig:
            stack.enter_context(mock.patch.object(argparse.ArgumentParser, name, stopping(name)))
        stack.enter_context(mock.patch.object(argparse.ArgumentParser, "error", error))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


BAD_VALUE = re.compile(r"invalid (int|float|choice)(?: value)?: '([^']*)'(?: \(choose from '([^']*)')?")
HELP = argparse.Namespace()          # --help: printed, nothing more to check


def parse(entry, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """(namespace, "") from `entry(argv)` stopped at its parse, or (None, the parser's error)."""
    argv = list(argv)
    for _ in range(len(argv) + 1):
        try:
            with stop_at_parse():
                entry(argv)
        except Parsed as p:
            return p.namespace, ""
        except ArgError as e:
            m = BAD_VALUE.search(str(e))
            token = m.group(2) if m else ""
            at = [i for i, a in enumerate(argv) if a == token or (a.startswith("-") and a.endswith(f"={token}"))]
            if is_placeholder(token) and at:              # a placeholder stands for a valid value
                valid = {"int": "1", "float": "1.0"}.get(m.group(1), m.group(3) or "")
                argv[at[0]] = valid if argv[at[0]] == token else argv[at[0]][:-len(token)] + valid
                continue
            return None, str(e)
        except SystemExit as e:
            if e.code in (0, None):
                return HELP, ""
            return None, f"exits {e.code} before parsing"
        return None, "returned without parsing a command line (tests/test_docs.py cannot check it)"
    return None, "placeholders left no valid command line"


# --------------------------------------------------------------------- config, as loaded for real

def schema_type(key: str):
    """The type of config key `key` (a.b.c), or None when it is no leaf of the schema."""
    obj, parts = Config(), key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(type(obj))
        if part not in hints:
            return None
        value = getattr(obj, part)
        if i == len(parts) - 1:
            return None if is_dataclass(value) else hints[part]
        if not is_dataclass(value):
            return None
        obj = value
    return None


def stand_ins(overrides: list[str]) -> list[str]:
    """Overrides with placeholder values standing for valid ones: the key is still checked."""
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if sep and ALL_CAPS.fullmatch(key):           # KEY=VALUE: stands for any override
            continue
        tp = schema_type(key) if sep and is_placeholder(value) else None
        if tp is None or tp is str:                   # unknown keys go through, to get the real error
            out.append(f"resume={REPO}" if tp is str and key == "resume" else text)
    return out


def validated_load(config: str, overrides: list[str], base: Config | None = None, check_data: bool = True) -> Config:
    """load_config as the docs check calls it: no data here (check_data off), placeholders stood in for."""
    if is_placeholder(config):
        config = ""
    if not config and base is None:
        base = Config()
        base.name = "docs"
    return load_config(config, stand_ins(overrides), base=base, check_data=False)


def run_config() -> Config:
    """Stands in for the run's own config (evaluate, probe start from it)."""
    cfg = Config()
    cfg.name = "run"
    return cfg


def after_load(cfg: Config, overrides: list[str], needs_root: bool = True) -> list[str]:
    """What a real start checks that is not about this machine: a data root where the source
    needs one; a bare class or label file name must be one shipped in configs/."""
    problems = []
    if needs_root and not cfg.data.root:
        try:
            check_root(cfg.data.source, "", cfg.data.download)
        except UserError as e:
            problems.append(f"config: {e}")
    for text in overrides:
        key, _, value = text.partition("=")
        if key in ("data.classes", "data.val_labels", "data.val_ids") and value and not is_placeholder(value) \
                and os.sep not in value and not os.path.exists(getattr(cfg.data, key.split(".")[1])):
            problems.append(f"{key}={value}: no such file in configs/")
    return problems


NAMED_KEY = re.compile(r"config key '([^'\[]+)")


def config_problems(load, overrides: list[str], what: str = "config") -> tuple[object, list[str]]:
    """(load(overrides), []) or (None, every mistake): an override named by an error is set
    aside and the rest loaded again, so that each bad key=value gets its own line."""
    problems, overrides = [], list(overrides)
    while True:
        try:
            loaded = load(overrides)
            return (None if problems else loaded), problems
        except UserError as e:
            problems.append(f"{what}: {e}")
            m = NAMED_KEY.search(str(e))
            named = [o for o in overrides if m and o.partition("=")[0].strip() == m.group(1)]
            if not named:
                return None, problems
            overrides.remove(named[0])


# ------------------------------------------------------------------------------ entry points

def check_train(ns) -> list[str]:
    cfg, problems = config_problems(lambda overrides: validated_load(ns.config, overrides), ns.overrides)
    return problems or after_load(cfg, ns.overrides)


def check_evaluate(ns) -> list[str]:
    from and_dist import evaluate
    with mock.patch.object(evaluate, "load_config", validated_load):
        return config_problems(lambda overrides: evaluate.evaluation_config(run_config(), ns.config, overrides),
                               ns.overrides)[1]


def check_write_only(what: str, args: list[str]) -> list[str]:
    """tools/docs.py: nothing, or --write FILE..."""
    if not args:
        return []
    if len(args) >= 2 and args[0] == "--write":
        return [f"--write {f}: no such file" for f in args[1:] if not (is_placeholder(f) or (REPO / f).is_file())]
    return [f"{what} takes no arguments or --write FILE...; got {' '.join(args)}"]


MODULES = {                   # module -> what its namespace is checked with (None: the parser only)
    "and_dist.train": check_train,
    "and_dist.evaluate": check_evaluate,
    "and_dist.probe": check_evaluate,      # probe.py takes evaluate's inputs
    "and_dist.export": None,
    "and_dist.prepare": None,
}


def check_module(name: str, args: list[str]) -> list[str]:
    if name == "torch.distributed.run":
        return check_torchrun(args)
    if name != "and_dist" and not name.startswith("and_dist."):
        return []                                    # not ours (pytest, pip, ...)
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return [f"no module {name} (python -m {name}: No module named {name})"]
    if spec.submodule_search_locations is not None:
        if importlib.util.find_spec(f"{name}.__main__") is None:
            return [f"{name} is a package without __main__: python -m {name} cannot run it"]
        name = f"{name}.__main__"
    module = importlib.import_module(name)
    if name not in MODULES and not (hasattr(module, "main") and "ArgumentParser" in inspect.getsource(module)):
        return [f"{name} is no entry point tests/test_docs.py knows (add it to MODULES)"]
    ns, error = parse(inspect.unwrap(module.main), args)
    if ns is None:
        return [error]
    check = MODULES.get(name)
    return check(ns) if check and ns is not HELP else []


def check_torchrun(args: list[str]) -> list[str]:
    from torch.distributed.run import get_args_parser

    def torchrun(argv):
        parser = get_args_parser()
        parser.prog = "torchrun"
        parser.parse_args(argv)
    ns, error = parse(torchrun, args)
    if ns is None:
        return [error]
    if ns is HELP or ns.no_python:
        return []
    if ns.module:
        return check_module(ns.training_script, ns.training_script_args)
    return check_script(ns.training_script, ns.training_script_args)


@functools.cache
def launcher():
    """launch/slurm.py as a module (it imports job.py and partition.py from beside it)."""
    if str(REPO / "launch") not in sys.path:
        sys.path.append(str(REPO / "launch"))
    spec = importlib.util.spec_from_file_location("docs_check_slurm", REPO / "launch" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_slurm(args: list[str]) -> list[str]:
    slurm = launcher()
    ns, error = parse(slurm.launch_args, args)
    if ns is None:
        return [error]
    if ns is HELP:
        return []
    submits = not ns.dry_run
    ns.dry_run = True                                # make_plan as --dry-run: no cluster asked, nothing submitted

    def plan(overrides):
        with mock.patch.object(slurm, "load_config", validated_load), \
                mock.patch.object(slurm.partition, "query", lambda: None):
            return slurm.make_plan(argparse.Namespace(**{**vars(ns), "overrides": overrides}))
    made, problems = config_problems(plan, ns.overrides, "launch/slurm.py")
    if problems:
        return problems
    return [p for run in made.runs for p in after_load(run.cfg, run.overrides, needs_root=submits)]


def check_script(path: str, args: list[str]) -> list[str]:
    if is_placeholder(path):
        return []
    file = Path(path) if Path(path).is_absolute() else REPO / path
    if not file.is_file():
        return [f"no such file: {path}"]
    file = file.resolve()
    if file == (REPO / "launch" / "slurm.py").resolve():
        return check_slurm(args)
    if file == (REPO / "tools" / "docs.py").resolve():
        return check_write_only("tools/docs.py", args)
    source = file.read_text(encoding="utf-8")
    if "ArgumentParser" not in source and "config_or_exit" not in source:
        return []                                    # no parser to ask: that the file exists is all
    saved = sys.argv, list(sys.path), dict(os.environ), set(sys.modules)
    try:
        sys.path.insert(0, str(file.parent))

        def script(argv):
            sys.argv = [str(file), *argv]
            runpy.run_path(str(file), run_name="__main__")
        ns, error = parse(script, args)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        for name in set(sys.modules) - saved[3]:
            if name == "common" or getattr(sys.modules.get(name), "__file__", "") == str(file):
                del sys.modules[name]                # benchmarks' common.py is no module of ours
    if ns is None:
        return [f"{path}: {error}"]
    if ns is not HELP and hasattr(ns, "config") and hasattr(ns, "overrides"):
        return check_train(ns)                       # a --config + key=value script (config_or_exit)
    return []


def check_python(args: list[str]) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        a = args[i]
        if a == "-m":
            return check_module(args[i + 1], args[i + 2:]) if i + 1 < len(args) else ["python -m without a module"]
        if a.startswith("-m"):
            return check_module(a[2:], args[i + 1:])
        if a == "-c":
            return []
        i += 2 if a in ("-X", "-W") else 1
    if i < len(args) and args[i].endswith(".py"):
        return check_script(args[i], args[i + 1:])
    return []


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s:#=][^:=]*?)\s*::?(?!=)", line)
        if m:
            targets.update(t for t in m.group(1).split() if not t.startswith("$") and not t[1:].isupper())
    return frozenset(targets)


def check_make(args: list[str]) -> list[str]:
    wanted = [a for a in args if not a.startswith("-") and "=" not in a]
    return [f"make {t}: no such target in the Makefile (targets: {', '.join(sorted(make_targets()))})"
            for t in wanted if t not in make_targets()]


PYTHON = re.compile(r"python(3(\.\d+)?)?")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
WRAPPERS = {"docker", "podman", "srun", "salloc", "env", "time", "timeout", "nohup", "exec", "sudo", "uv",
            "apptainer", "singularity", "enroot"}     # commands that start another: checked from its python/torchrun


def check(cmd: Command) -> list[str]:
    """What is wrong with `cmd` ([] when it is right or names none of our entry points)."""
    argv = cmd.argv
    while argv and ENV_ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        return cmd.problems
    if argv[0] == "make":
        return cmd.problems + check_make(argv[1:])
    if argv[0].endswith(".py"):
        return cmd.problems + check_script(argv[0], argv[1:])
    for i, word in enumerate(argv if argv[0] not in WRAPPERS else argv[1:], start=argv[0] in WRAPPERS):
        if word == "torchrun":
            return cmd.problems + check_torchrun(argv[i + 1:])
        if PYTHON.fullmatch(os.path.basename(word)):
            return cmd.problems + check_python(argv[i + 1:])
        if argv[0] not in WRAPPERS:
            break
    return cmd.problems


def command_problems(doc: Path) -> list[str]:
    """One line per mistake: where, the command, what is wrong (checked from the repository
    root, where the commands run)."""
    with contextlib.chdir(REPO):
        return [f"{c.where()}: {c.text}\n    {p}" for c in commands(doc) for p in check(c)]


# ----------------------------------------------------------------------------- links and paths

HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
HTML_ID = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def prose(doc: Path) -> str:
    """The page with its fenced blocks blanked (line numbers kept)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    for block in blocks(doc):
        for n in range(block.line, block.line + len(block.lines) + 2):
            if n <= len(lines):
                lines[n - 1] = ""
    return "\n".join(lines)


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(doc: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    text = prose(doc)
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    out.update(HTML_ID.findall(text))
    return frozenset(out)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def repo_path_problem(token: str) -> str | None:
    token = token.split("=")[-1].strip("\"'()[]{},;").rstrip(".:")
    token = re.sub(r":\d+$", "", token)
    first = token.split("/", 1)[0]
    if "/" not in token or first not in REPO_DIRS or is_placeholder(token) or re.search(r"[{}]|\.\.\.|…", token):
        return None
    if any(c in token for c in "*?"):
        return None if any(REPO.glob(token.rstrip("/"))) else f"`{token}` matches no file"
    return None if (REPO / token).exists() else f"`{token}`: no such file or folder in the repository"


def link_problems(doc: Path) -> list[str]:
    text = prose(doc)
    problems = []
    for m in CODE_SPAN.finditer(text):
        if "\n\n" in m.group(2):
            continue
        for token in m.group(2).split():
            p = repo_path_problem(token)
            if p:
                problems.append(f"{rel(doc)}:{line_of(text, m.start())}: {p}")
    bare = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    targets = [(m.group(1), m.start()) for m in LINK.finditer(bare)] + \
              [(m.group(1), m.start()) for m in REF_DEF.finditer(bare)]
    for target, offset in sorted(targets, key=lambda t: t[1]):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue                                  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        where = f"{rel(doc)}:{line_of(bare, offset)}: link ({target})"
        file = (doc.parent / path).resolve() if path else doc
        if path and not file.exists():
            problems.append(f"{where}: {rel(file)} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{where}: no heading #{anchor} in {rel(file)} "
                            f"(it has: {', '.join(sorted(anchors(file))) or 'none'})")
    return problems


# ------------------------------------------------------------------------------------- tests

DOCS = documents()
DEMOS = [b for d in DOCS for b in blocks(d) if b.lang in SHELLS and b.demo]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_shell_commands(doc):
    """Every command naming an entry point: module, flags, config, overrides and files exist."""
    problems = command_problems(doc)
    if problems:
        pytest.fail(f"{len(problems)} command problem(s) in {rel(doc)}:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_links_and_paths(doc):
    """Every relative link (and #anchor) and every inline-code repository path exists."""
    problems = link_problems(doc)
    if problems:
        pytest.fail(f"{len(problems)} missing target(s) in {rel(doc)}:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("block", DEMOS, ids=lambda b: f"{rel(b.doc)}:{b.line}")
def test_demo_block_runs(block, tmp_path):
    """A ```bash demo block runs as written: every command exits 0."""
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = {**ENV, "HOME": str(home), "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    lines = logical_lines(block)
    assert lines, f"{rel(block.doc)}:{block.line}: a demo block without a command"
    for n, text in lines:
        try:
            proc = subprocess.run(["bash", "-c", text], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{rel(block.doc)}:{n}: {text}\n    still running after {DEMO_TIMEOUT_S} s", pytrace=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            pytest.fail(f"{rel(block.doc)}:{n}: {text}\n    exit status {proc.returncode}; last lines:\n{tail}",
                        pytrace=False)


def test_there_is_something_to_check():
    """The pages exist and hold commands the checks recognise (a reader that finds nothing passes everything)."""
    assert (DOCS_ROOT / "README.md") in DOCS
    checked = [c for d in DOCS for c in commands(d)]
    assert any("and_dist.train" in c.argv for c in checked), "no `python -m and_dist.train` found in the docs"


BROKEN = """\
# A page of mistakes

See [the guide](docs/nowhere.md), [results](docs/results.md#no-such-heading) and `configs/nothing.yaml`.

```bash
python -m and_dist.train --config demo train.batch_size=abc train.lrr=1   # wrong type, unknown key
python -m and_dist.train --config demo train.batchsize=64 \\
    data.root=/data/x                                               # unknown key
python -m and_dist.train --config no_such_config
python -m and_dist.train --config cub200_resnet18                   # no data.root
python -m and_dist.train --confg demo
python -m and_dist.evaluate knnn --checkpoint RUN
python -m and_dist.evaluate knn --checkpoint RUN eval.knn_k=0 && python -m and_dist.comparee RUN
python -m and_dist.probe --checkpoint RUN probe.layerz=[conv1]
torchrun --nproc_per_node=2 --no-such-flag -m and_dist.train
torchrun --nproc_per_node=2 -m and_dist.train --config demo curriculum.rounds=N model.arch=vgg
python launch/slurm.py --config demo --nodes two --time=MINUTES
python launch/slurm.py --config demo --sweep train.lr
python launch/slurm.py --config cifar10_resnet18 resume=RUN/checkpoints/r0-end
python benchmarks/discovery.py --sizez 10
python tools/missing.py
docker run --gpus all and_dist:gpu torchrun --nproc_per_node=8 -m and_dist.trian
pip install torchrun python
make demoo
```
"""

EXPECTED = [
    ":6: python -m and_dist.train --config demo train.batch_size=abc",
    "config key 'train.batch_size' expects int, got str 'abc'",
    "unknown config key 'train.lrr'; did you mean 'train.lr'?",
    ":7: python -m and_dist.train --config demo train.batchsize=64",
    "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?",
    "config 'no_such_config' not found",
    "data.root is empty; data.source=imagefolder",
    "unrecognized arguments: --confg",
    "invalid choice: 'knnn'",
    "config key 'eval.knn_k' must be >= 1",
    "no module and_dist.comparee",
    "unknown config key 'probe.layerz'",
    "torchrun: ",
    "config key 'model.arch' must be one of",
    "argument --nodes: invalid int value: 'two'",
    "--sweep 'train.lr': expected KEY=V1,V2,...",
    "a checkpoint path in resume is not supported here",
    "unrecognized arguments: --sizez 10",
    "no such file: tools/missing.py",
    "no module and_dist.trian",
    "make demoo: no such target",
    "docs/nowhere.md does not exist",
    "no heading #no-such-heading in docs/results.md",
    "`configs/nothing.yaml`: no such file or folder in the repository",
]


def test_the_checks_catch_broken_commands(tmp_path):
    """The checks themselves: a page of broken commands and links fails with each mistake named."""
    (tmp_path / "docs").symlink_to(REPO / "docs")
    page = tmp_path / "BROKEN.md"
    page.write_text(BROKEN)
    problems = command_problems(page) + link_problems(page)
    found = "\n".join(problems)
    missing = [e for e in EXPECTED if e not in found]
    assert not missing, f"not reported: {missing}\nreported:\n{found}"
    assert len(problems) == 22, f"one problem per broken command or link expected:\n{found}"
    assert not any("curriculum.rounds" in p.split("\n    ")[1] for p in problems if "\n    " in p), \
        "a placeholder value (curriculum.rounds=N) was not stood in for"
    assert all(p.startswith(str(page) + ":") for p in problems)


GOOD = """\
# A page of right commands, in every form the checks read

[a page](docs/training.md), [a heading](docs/performance.md#gpu-figures), [here](#a-page-of-right-commands-in-every-form-the-checks-read),
`RUN/probes.json`, `benchmarks/results/<YYYY-MM-DD>-<gpu>.md`, `tests/test_*.py`.

```console
$ python -m and_dist.train --config demo \\
    train.lr=0.1 train.nesterov=false data.crop_scale=[0.2,1.0]   # YAML values
training...
$ make test 2>&1 | tail -3
```

```sh
cd /work && PYTHONPATH=$PWD .venv/bin/python -m and_dist.evaluate all --checkpoint RUN resume=auto > out.txt
python -m and_dist.probe --checkpoint RUN [--config FILE] [probe.epochs=N probe.layers=[conv1,conv5]]
python -m and_dist.prepare /data/in /data/out --shorter-side N [--workers=N] [--labels FILE ...]
python -m and_dist.train --config cub200_resnet18 data.root=/data/cub200 resume=RUN_DIR/checkpoints/r0-end
python -m and_dist.train --help; python tools/docs.py --write docs/config.md
python -m torch.distributed.run --nproc_per_node=2 -m and_dist.train --config demo curriculum.rounds=N KEY=VALUE
python launch/slurm.py --config imagenet_alexnet --nodes N --gpus-per-node 8 --dry-run --then probe
python launch/slurm.py --config cifar10_resnet18 --sweep train.lr=0.01,0.03 --container-image=/path/x.sqsh
python benchmarks/gpu_session.py --commit $(git rev-parse HEAD) --device cpu --quick --out /tmp/s
python tools/raw_pixel_knn.py --config demo eval.knn_k=20
python tools/docs.py --write docs/design.md docs/config.md
docker build -t and_dist:gpu . && git status
```
"""


def test_the_checks_pass_right_commands(tmp_path):
    """...and pass right ones: placeholders, usage brackets, prompts, continuations, comments,
    redirects, && and ;, wrappers."""
    (tmp_path / "docs").symlink_to(REPO / "docs")
    page = tmp_path / "GOOD.md"
    page.write_text(GOOD)
    checked = commands(page)
    assert len(checked) == 18, [c.text for c in checked]
    problems = command_problems(page) + link_problems(page)
    assert not problems, "\n".join(problems)
