"""Write each notebook's code cells as one Python script, so that tools made for source files read the chapters.

``duplicates`` (``make duplicates``, tests/test_notebooks.py) reads the scripts beside kplib/ and benchmarks/ to find
code a chapter repeats from another chapter or from the library. IPython lines (``%magic``, ``!shell``) become
comments; cells are separated by ``# %%`` lines (the percent format editors understand).

Usage::

    .venv/bin/python tools/notebooks_to_scripts.py notebooks _build/scripts/notebooks
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat


def notebook_code(nb_path: str | Path) -> str:
    """The code cells of one notebook as a script (IPython-only lines commented out)."""
    cells = nbformat.read(nb_path, as_version=4).cells
    blocks = []
    for cell in cells:
        if cell.cell_type != "code":
            continue
        lines = [f"# {line}" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines()]
        blocks.append("\n".join(lines))
    return "".join(f"# %%\n{block}\n\n" for block in blocks)


def convert(notebook_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``<out_dir>/<stem>.py`` for every ``*.ipynb`` in ``notebook_dir``; returns the scripts written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for nb_path in sorted(Path(notebook_dir).glob("*.ipynb")):
        script = out / f"{nb_path.stem}.py"
        script.write_text(notebook_code(nb_path), encoding="utf-8")
        written.append(script)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    written = convert(args.notebook_dir, args.out_dir)
    print(f"{len(written)} notebooks -> {args.out_dir}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
