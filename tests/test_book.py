"""Build the whole book once, the way `make book` does (-W -n --keep-going, every notebook executed), then open every
page in headless Chromium (tests/browser_check.py).

The book sources (_config.yml, _toc.yml, book/, notebooks/) are copied into tmp_path and built there, so the test
never writes into the working tree except the screenshots, which go to <repo>/artifacts/screenshots (gitignored).
MPLBACKEND=Agg is set on purpose: every chapter must still embed its figures (it runs '%matplotlib inline').
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "artifacts" / "screenshots"
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book", "notebooks")
JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"


def _load_browser_check():
    spec = importlib.util.spec_from_file_location("browser_check", Path(__file__).parent / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["browser_check"] = module
    spec.loader.exec_module(module)
    return module


def toc_files(toc_path: Path = REPO / "_toc.yml") -> list[str]:
    """Every document named in _toc.yml (root first), without suffix."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def test_toc_lists_only_existing_files_and_every_notebook():
    files = toc_files()
    for f in files:
        assert any((REPO / f"{f}{ext}").is_file() for ext in (".md", ".ipynb")), f"_toc.yml names missing file {f}"
    listed = {f for f in files if f.startswith("notebooks/")}
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.stem}" in listed, f"{nb.name} is not in _toc.yml: the book would not show it"


def test_config_is_strict_and_offline():
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "force"
    assert cfg["execute"]["raise_on_error"] is True and cfg["execute"]["allow_errors"] is False
    assert cfg["execute"]["timeout"] >= 600
    assert not any(cfg["launch_buttons"].get(k) for k in ("binderhub_url", "jupyterhub_url", "colab_url", "thebe"))
    assert not any(cfg["html"].get(k) for k in ("use_repository_button", "use_issues_button", "use_edit_page_button"))
    assert not cfg["html"]["analytics"].get("google_analytics_id")


@pytest.mark.slow
@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_book_builds_and_every_page_renders(tmp_path):
    src = tmp_path / "book_src"
    src.mkdir()
    for name in BOOK_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_build"))
        else:
            shutil.copy2(path, src / name)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(src), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    build_seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"book build failed ({build_seconds:.0f} s):\n{log[-6000:]}"
    # Sphinx warnings read "<file>: WARNING: ..." (-W already makes them fail; this names them in the message)
    assert not re.search(r"\bWARNING:", log), f"build log has Sphinx warnings:\n{log[-6000:]}"
    html = src / "_build" / "html"
    for f in toc_files(src / "_toc.yml"):
        assert (html / f"{f}.html").is_file(), f"no HTML page for {f}"

    browser_check = _load_browser_check()
    report = browser_check.check_site(html, SCREENSHOTS)
    print(f"book build: {build_seconds:.0f} s\n{report.summary()}")
    assert report.ok, report.summary()
    pages = {p.page: p for p in report.pages}
    for f in toc_files(src / "_toc.yml"):
        page = pages[f"{f}.html"]
        assert page.screenshot and Path(page.screenshot).stat().st_size > 10_000
        if f.startswith("notebooks/"):
            assert page.images >= 1, f"{f}: no figure in the rendered page (inline backend not active?)"


def _png(path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [0, 1])
    fig.savefig(path)


@pytest.mark.xdist_group("book")
def test_browser_check_catches_what_it_promises(tmp_path):
    """A tiny site with one good page and one page holding each kind of defect."""
    browser_check = _load_browser_check()
    _png(tmp_path / "fig.png")
    (tmp_path / "index.html").write_text(
        '<html><head><title>ok</title></head><body><h1 id="top">ok</h1><img src="fig.png">'
        '<a href="bad.html#top">next</a><a href="#top">self</a><a href="https://example.org/">ext</a></body></html>'
    )
    (tmp_path / "bad.html").write_text(
        '<html><head><title>bad</title><link rel="stylesheet" href="_static/missing.css"></head><body>'
        '<h1 id="top">bad</h1><img src="nope.png"><a href="gone.html">gone</a><a href="index.html#nowhere">anchor</a>'
        '<div class="cell_output docutils container"><div class="output stderr highlight-myst-ansi notranslate">'
        '<pre>UserWarning: boom</pre></div></div></body></html>'
    )
    report = browser_check.check_site(tmp_path, tmp_path / "shots")
    pages = {p.page: p for p in report.pages}
    assert set(pages) == {"index.html", "bad.html"}
    assert pages["index.html"].problems == [] and pages["index.html"].images == 1
    problems = "\n".join(pages["bad.html"].problems)
    assert "image did not load" in problems and "nope.png" in problems
    assert "broken local link" in problems and "gone.html" in problems
    assert "_static/missing.css" in problems
    assert "broken anchor" in problems and "#nowhere" in problems
    assert "error output" in problems and "boom" in problems
    assert not report.ok
    assert "https://example.org/" in report.external
    assert (tmp_path / "shots" / "index.png").stat().st_size > 1000
