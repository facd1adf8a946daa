"""The shape bars every chapter (a notebook in notebooks/) must meet, measured on the notebook source.

Measured as ``../shared/tools/page-report`` measures them:

- **setup**: the longest of the first three *visible* code cells (the parameters cell counts), in lines: at most 8;
- **prose vs code**: lines of Markdown at least the lines of visible code;
- **long lines**: no code line (visible or not) over 88 characters;

where a code cell tagged ``remove-input``, ``remove-cell`` or ``hide-input`` is not visible. And, for teaching:

- **exercises**: 3 to 5 sphinx-exercise exercises (``{exercise}`` or ``{exercise-start}``), each with a solution
  (``{solution}`` or ``{solution-start}``).

Usage::

    .venv/bin/python tools/page_shape.py [notebooks]     # prints each chapter's figures, exits 1 on a problem
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

HIDDEN_TAGS = ("remove-input", "remove-cell", "hide-input")
MAX_SETUP_LINES = 8
MAX_LINE_LENGTH = 88
EXERCISES = (3, 5)
_DIRECTIVE = r"^\s*(?:`{3,}|:{3,})\s*\{%s\}"
_EXERCISE = re.compile(_DIRECTIVE % "exercise(?:-start)?", re.M)
_SOLUTION = re.compile(_DIRECTIVE % "solution(?:-start)?", re.M)


@dataclass
class PageShape:
    """One chapter's figures (lines)."""

    name: str
    setup: int
    prose: int
    visible_code: int
    long_lines: list[str]
    exercises: int
    solutions: int

    def problems(self) -> list[str]:
        """What this chapter misses of the bars, one line each."""
        found = []
        if self.setup > MAX_SETUP_LINES:
            found.append(f"setup cell of {self.setup} lines (at most {MAX_SETUP_LINES} in the first three visible "
                         f"code cells: move plumbing into kplib.book or tag it remove-input/hide-input)")
        if self.prose < self.visible_code:
            found.append(f"{self.prose} lines of prose for {self.visible_code} lines of visible code")
        if self.long_lines:
            found.append(f"{len(self.long_lines)} code line(s) over {MAX_LINE_LENGTH} characters, first: "
                         f"{self.long_lines[0]}")
        lo, hi = EXERCISES
        if not lo <= self.exercises <= hi:
            found.append(f"{self.exercises} exercises ({lo} to {hi}: {{exercise}} directives)")
        if self.solutions < self.exercises:
            found.append(f"{self.exercises} exercises but {self.solutions} solutions ({{solution}} directives)")
        return [f"{self.name}: {p}" for p in found]


def _lines(cell) -> list[str]:
    return cell.source.splitlines()


def page_shape(nb_path: str | Path) -> PageShape:
    """Measure one notebook."""
    nb_path = Path(nb_path)
    cells = nbformat.read(nb_path, as_version=4).cells
    code = [c for c in cells if c.cell_type == "code"]
    visible = [c for c in code if not set(c.get("metadata", {}).get("tags", [])) & set(HIDDEN_TAGS)]
    markdown = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    long_lines = [
        f"cell {cells.index(c) + 1} line {i + 1} ({len(line)} chars)"
        for c in code for i, line in enumerate(_lines(c)) if len(line) > MAX_LINE_LENGTH
    ]
    return PageShape(
        name=nb_path.name,
        setup=max((len(_lines(c)) for c in visible[:3]), default=0),
        prose=sum(len(_lines(c)) for c in cells if c.cell_type == "markdown"),
        visible_code=sum(len(_lines(c)) for c in visible),
        long_lines=long_lines,
        exercises=len(_EXERCISE.findall(markdown)),
        solutions=len(_SOLUTION.findall(markdown)),
    )


def page_shape_problems(notebook_dir: str | Path = "notebooks") -> list[str]:
    """Every problem of every chapter in ``notebook_dir`` (empty when all meet the bars)."""
    notebooks = sorted(Path(notebook_dir).glob("*.ipynb"))
    if not notebooks:
        return [f"no notebooks in {notebook_dir}"]
    return [p for nb in notebooks for p in page_shape(nb).problems()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook_dir", nargs="?", default="notebooks")
    notebook_dir = Path(parser.parse_args(argv).notebook_dir)
    for nb in sorted(notebook_dir.glob("*.ipynb")):
        s = page_shape(nb)
        print(f"{s.name:42s} setup {s.setup:3d}  prose {s.prose:4d}  visible code {s.visible_code:4d}  "
              f"long lines {len(s.long_lines):3d}  exercises {s.exercises}  solutions {s.solutions}")
    problems = page_shape_problems(notebook_dir)
    print("\n".join(problems) or "every chapter meets the page-shape bars")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
