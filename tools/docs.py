"""The generated parts of the guide, so it cannot describe keys or files that changed: the key
table of docs/config.md (every config key, its default and help, from the schema) and the
repository's layout in docs/design.md (every package and module of and_dist/, the entry points
first, launch/, tools/ and benchmarks/, each with the first sentence of its docstring, and the
shipped configs). The docs hold each between markers; a test checks they are what this prints.

    python tools/docs.py                                          # print both
    python tools/docs.py --write docs/config.md docs/design.md    # regenerate the blocks in the guide
"""
from __future__ import annotations

import ast
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml

from and_dist.config import Config

REPO = Path(__file__).resolve().parents[1]
WRITE = "python tools/docs.py --write docs/config.md docs/design.md"
TABLE = f"<!-- key table: {WRITE} -->", "<!-- end of key table -->"
LAYOUT = f"<!-- layout: {WRITE} -->", "<!-- end of layout -->"
ENTRY_POINTS = ("train", "compare", "evaluate", "probe", "export", "prepare", "config")
WIDTH = 86          # the description column


def key_table(obj=None, prefix: str = "") -> str:
    """The key table (markdown), one row per config key, from the schema's helps."""
    obj = Config() if obj is None else obj
    rows = [] if prefix else ["| key | default | what it does |", "| --- | --- | --- |"]
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            rows.append(key_table(value, f"{prefix}{f.name}."))
            continue
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" (one of {', '.join(choices)})" if choices else "")
        default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{prefix}{f.name}` | `{default}` | {text.replace('<', '&lt;')} |")
    return "\n".join(rows)


def summary(path: Path) -> str:
    """The first sentence of a file's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    for end in (". ", ".\n"):
        first = first.split(end)[0]
    first = first.rstrip(".")
    return first if len(first) <= WIDTH else first[:WIDTH - 3].rstrip() + "..."  # lines of ~110


def modules(folder: Path, order=()) -> list[Path]:
    files = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(files, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def layout() -> str:
    out = ["```"]

    def row(indent: int, name: str, text: str) -> None:
        out.append(f"{' ' * indent}{name:<{max(24 - indent, len(name) + 1)}}{text}".rstrip())

    pkg = REPO / "and_dist"
    row(0, "and_dist/", summary(pkg / "__init__.py"))
    for p in modules(pkg, ENTRY_POINTS):
        row(2, p.name, summary(p))
    def package(folder: Path, indent: int) -> None:
        """A package's line, its modules', then its own packages' (method/kernels, data/sources)."""
        row(indent, f"{folder.name}/", summary(folder / "__init__.py"))
        for p in modules(folder):
            row(indent + 2, p.name, summary(p))
        for sub in sorted(d for d in folder.iterdir() if (d / "__init__.py").exists()):
            package(sub, indent + 2)

    for sub in sorted(d for d in pkg.iterdir() if (d / "__init__.py").exists()):
        package(sub, 2)
    for folder in ("launch", "tools", "benchmarks"):
        row(0, f"{folder}/", "")
        for p in modules(REPO / folder):
            row(2, p.name, summary(p))
    configs = sorted(p.name for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".txt"))
    row(0, "configs/", ", ".join(configs))
    row(0, "tests/", "test_*.py; helpers.py (shared helpers), workers/ (scripts run under torchrun), blocked_imports/")
    out.append("```")
    return "\n".join(out)


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """`text` with what lies between the markers `start` and `end` replaced by `block`."""
    head, sep, rest = text.partition(start)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise ValueError(f"no markers {start} ... {end}")
    return f"{head}{start}\n{block}\n{end}{tail}"


BLOCKS = ((TABLE, key_table), (LAYOUT, layout))


def regenerate(text: str) -> str:
    """`text` with every generated block it holds made anew."""
    for (start, end), make in BLOCKS:
        if start in text:
            text = replace_block(text, start, end, make())
    return text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and sys.argv[2:]:
        for doc in map(Path, sys.argv[2:]):
            doc.write_text(regenerate(doc.read_text()))
    else:
        print(key_table(), layout(), sep="\n\n")
