"""The chapters' shape bars (issue 14), measured on the notebooks' source by tools/page_shape.py: a setup of at most
8 lines, at least as much prose as visible code, no code line over 88 characters, 3 to 5 exercises with solutions.

Run alone: ``.venv/bin/python -m pytest tests/test_page_shape.py -q``; ``.venv/bin/python tools/page_shape.py`` prints
each chapter's figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from page_shape import page_shape, page_shape_problems  # noqa: E402  (tools/ is a folder of scripts)


def test_every_chapter_meets_the_page_shape_bars():
    problems = page_shape_problems(REPO / "notebooks")
    assert not problems, "chapters missing the page-shape bars:\n" + "\n".join(problems)


EXERCISES = "".join(
    f"```{{exercise}}\n:label: ex-{i}\n\nPredict, then check.\n```\n\n```{{solution}} ex-{i}\nBecause.\n```\n\n"
    for i in range(3)
)


def _notebook(path: Path, code: list[tuple[str, list[str]]], prose: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(prose)]
    for source, tags in code:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_page_shape_reports_every_defect_of_every_chapter(tmp_path):
    long_prose = "# Good\n\n" + "A line of prose.\n" * 20 + EXERCISES
    hidden_plumbing = "\n".join(f"x{i} = {i}" for i in range(30))
    _notebook(tmp_path / "01_good.ipynb", [("MODEL = 'standin'\nSEED = 0", ["parameters"]),
                                           (hidden_plumbing, ["remove-input"]), ("setup = 1", [])], long_prose)
    shape = page_shape(tmp_path / "01_good.ipynb")
    assert (shape.setup, shape.visible_code, shape.exercises, shape.solutions) == (2, 3, 3, 3)
    assert page_shape_problems(tmp_path) == []

    long_setup = "\n".join(f"import m{i}" for i in range(9))
    _notebook(tmp_path / "02_bad.ipynb", [("A = 1", ["parameters"]), (long_setup, []),
                                          ("y = '" + "z" * 90 + "'", ["hide-input"])],
              "# Bad\n\n```{exercise}\n:label: only\n\nOne.\n```\n")
    problems = page_shape_problems(tmp_path)
    assert all(p.startswith("02_bad.ipynb: ") for p in problems), problems
    text = "\n".join(problems)
    assert "setup cell of 9 lines" in text
    assert "lines of prose for 10 lines of visible code" in text
    assert "1 code line(s) over 88 characters, first: cell 4 line 1 (96 chars)" in text
    assert "1 exercises (3 to 5" in text and "1 exercises but 0 solutions" in text
    _notebook(tmp_path / "03_bad_too.ipynb", [("B = 2\n" * 9, [])], "# Also bad")
    assert {p.split(":")[0] for p in page_shape_problems(tmp_path)} == {"02_bad.ipynb", "03_bad_too.ipynb"}
