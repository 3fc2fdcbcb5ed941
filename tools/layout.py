"""The repository's layout, generated from the code: every package and module of and_dist/ (the
entry points first), launch/, tools/ and benchmarks/, each with the first sentence of its
docstring, and the shipped configs. docs/design.md holds it between markers, and a test checks
that it is what this prints, so the guide cannot describe files that moved.

    python tools/layout.py                          # print it
    python tools/layout.py --write docs/design.md   # regenerate the block in the guide
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from and_dist.config import replace_block

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- layout: python tools/layout.py --write docs/design.md -->", "<!-- end of layout -->"
ENTRY_POINTS = ("train", "compare", "evaluate", "probe", "export", "prepare", "config")
WIDTH = 86          # the description column


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
        out.append(f"{' ' * indent}{name:<{24 - indent}}{text}".rstrip())

    pkg = REPO / "and_dist"
    row(0, "and_dist/", summary(pkg / "__init__.py"))
    for p in modules(pkg, ENTRY_POINTS):
        row(2, p.name, summary(p))
    for sub in sorted(d for d in pkg.iterdir() if (d / "__init__.py").exists()):
        row(2, f"{sub.name}/", summary(sub / "__init__.py"))
        for p in modules(sub):
            row(4, p.name, summary(p))
    for folder in ("launch", "tools", "benchmarks"):
        row(0, f"{folder}/", "")
        for p in modules(REPO / folder):
            row(2, p.name, summary(p))
    configs = sorted(p.name for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".txt"))
    row(0, "configs/", ", ".join(configs))
    row(0, "tests/", "test_*.py; helpers.py (shared helpers), workers/ (scripts run under torchrun), blocked_imports/")
    out.append("```")
    return "\n".join(out)


def with_layout(text: str) -> str:
    return replace_block(text, START, END, layout())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        doc = Path(sys.argv[2])
        doc.write_text(with_layout(doc.read_text()))
    else:
        print(layout())
