"""Code repeated across the chapters, the library and the benchmarks, found by the ``duplicates`` command.

The notebooks' code cells (as scripts, tools/notebooks_to_scripts.py), ``kplib/`` and ``benchmarks/`` are staged in a
temporary folder outside any git checkout (``duplicates --repo`` reads only the files git tracks when it is inside
one, and build folders are ignored), then ``duplicates`` lists every pair of places sharing 6 or more lines, the same
or of the same shape. ``duplicates`` always exits 0: its first line says ``no duplicates`` when there are none, and
``incomplete: ...`` lines say what it could not read. Any pair, or an incomplete run, is a failure here.

Usage (``make duplicates``)::

    .venv/bin/python tools/repeated_code.py [--scripts _build/scripts/notebooks]

exits 0 when nothing repeats, 1 with the list of pairs, 2 when ``duplicates`` is not installed. Row paths name the
staged files: ``notebooks/<chapter>.py:<lines>`` are lines of the script ``--scripts`` writes.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks_to_scripts import convert  # noqa: E402  (tools/ is a folder of scripts, not a package)

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("kplib", "benchmarks")


@dataclass
class RepeatedCode:
    ok: bool
    report: str


def stage(repo: Path, dest: Path) -> Path:
    """Copy what ``duplicates`` should read into ``dest``: notebook scripts, and the .py files of SOURCE_DIRS."""
    convert(repo / "notebooks", dest / "notebooks")
    for name in SOURCE_DIRS:
        for path in sorted((repo / name).rglob("*.py")):
            target = dest / path.relative_to(repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest


def find_repeated_code(repo: str | Path = REPO, seconds: int = 120) -> RepeatedCode:
    """Run ``duplicates`` over the staged tree; ``ok`` is True only for a complete run that found no pair."""
    command = shutil.which("duplicates")
    if command is None:
        raise FileNotFoundError("the `duplicates` command is not on PATH")
    with tempfile.TemporaryDirectory(prefix="kpl-duplicates-") as tmp:
        inside_git = subprocess.run(["git", "-C", tmp, "rev-parse", "--is-inside-work-tree"],
                                    capture_output=True, text=True).returncode == 0
        if inside_git:
            raise RuntimeError(f"{tmp} lies inside a git checkout: set TMPDIR to a folder outside it")
        staged = stage(Path(repo), Path(tmp) / "tree")
        proc = subprocess.run([command, "--repo", str(staged), "--most", "200", "--seconds", str(seconds)],
                              capture_output=True, text=True, timeout=seconds + 60)
    report = (proc.stdout + proc.stderr).strip()
    lines = report.splitlines()
    ok = bool(lines) and lines[0].startswith("no duplicates") and not any(
        line.startswith("incomplete:") for line in lines)
    return RepeatedCode(ok=ok, report=report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", help="also write the notebook scripts here, to read the rows' line numbers")
    args = parser.parse_args(argv)
    if args.scripts:
        convert(REPO / "notebooks", args.scripts)
    try:
        result = find_repeated_code()
    except FileNotFoundError as exc:
        print(f"{exc}: nothing to check here", file=sys.stderr)
        return 2
    print(result.report)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
