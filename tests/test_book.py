"""Build the whole book once from clean, the way CI must (-W -n --keep-going, every notebook executed: the copy's
_config.yml is switched from `make book`'s execution cache to execute_notebooks: force), then open every page in
headless Chromium (tests/browser_check.py).

The book sources (_config.yml, _toc.yml, book/ with the MathJax copy `make mathjax` puts in book/_static/mathjax,
notebooks/) are copied into tmp_path and built there, so the test never writes into the working tree except the
screenshots, which go to <repo>/artifacts/screenshots (gitignored). MPLBACKEND=Agg is set on purpose: every chapter
must still embed its figures (it runs '%matplotlib inline').
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
MATHJAX = REPO / "book" / "_static" / "mathjax" / "tex-chtml.js"
BUILD_ENV = {"MPLBACKEND": "Agg", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}


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


def _require_mathjax() -> None:
    assert MATHJAX.is_file(), f"{MATHJAX} is missing: run `make mathjax` (npm package mathjax@3 for offline maths)"


def test_config_is_strict_and_offline():
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    # `make book` re-uses executed notebooks; the cache lives outside _build/html and the build test forces execution
    assert cfg["execute"]["execute_notebooks"] == "cache"
    assert "cache" not in cfg["execute"] or not str(cfg["execute"]["cache"]).startswith("_build/html")
    assert cfg["execute"]["raise_on_error"] is True and cfg["execute"]["allow_errors"] is False
    assert cfg["execute"]["timeout"] >= 600
    assert not any(cfg["launch_buttons"].get(k) for k in ("binderhub_url", "jupyterhub_url", "colab_url", "thebe"))
    assert not any(cfg["html"].get(k) for k in ("use_repository_button", "use_issues_button", "use_edit_page_button"))
    assert not cfg["html"]["analytics"].get("google_analytics_id")


def test_config_serves_mathjax_and_exercises():
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    assert {"dollarmath", "amsmath"} <= set(cfg["parse"]["myst_enable_extensions"])
    sphinx = cfg["sphinx"]["config"]
    # MathJax from the book's own _static (mathjax_path is relative to _static), never a URL
    assert "://" not in sphinx["mathjax_path"] and not sphinx["mathjax_path"].startswith("/")
    static = [REPO / p for p in sphinx["html_static_path"]]
    assert any((p / sphinx["mathjax_path"]).resolve() == MATHJAX.resolve() for p in static), \
        f"mathjax_path {sphinx['mathjax_path']} does not resolve to {MATHJAX} through html_static_path {static}"
    # book/_static/kpl.css makes an 88-column code line fit its box at 1280 px (the browser check measures it)
    assert "kpl.css" in sphinx["html_css_files"] and (REPO / "book" / "_static" / "kpl.css").is_file()
    assert ".cache" in cfg["exclude_patterns"], "make mathjax's npm files (.cache) must not become pages"
    assert not (REPO / "_static").exists(), "a top-level _static makes Jupyter Book add every .js below it to each page"
    assert "sphinx_exercise" in cfg["sphinx"]["extra_extensions"]
    assert "div.solution" in sphinx["togglebutton_selector"], "solutions must be collapsed behind a toggle"


def _copy_sources(dest: Path, config_update: dict | None = None) -> None:
    """Copy the book sources into ``dest``; the copy's _config.yml builds from clean with forced execution."""
    dest.mkdir()
    for name in BOOK_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_build"))
        else:
            shutil.copy2(path, dest / name)
    cfg = yaml.safe_load((dest / "_config.yml").read_text())
    cfg["execute"]["execute_notebooks"] = "force"
    for key, value in (config_update or {}).items():
        cfg[key] = value
    (dest / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _build(src: Path, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, str, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(src), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, env={**os.environ, **BUILD_ENV}, timeout=timeout,
    )
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"book build failed ({seconds:.0f} s):\n{log[-6000:]}"
    # Sphinx warnings read "<file>: WARNING: ..." (-W already makes them fail; this names them in the message)
    assert not re.search(r"\bWARNING:", log), f"build log has Sphinx warnings:\n{log[-6000:]}"
    return proc, log, seconds


@pytest.mark.slow
@pytest.mark.book
@pytest.mark.xdist_group("book")
def test_book_builds_and_every_page_renders(tmp_path):
    _require_mathjax()
    src = tmp_path / "book_src"
    _copy_sources(src)
    _, log, build_seconds = _build(src)
    assert not (src / "_build" / ".jupyter_cache").exists(), "the build test must execute every notebook (force)"
    html = src / "_build" / "html"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax was not copied into the build"
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


_GOOD_MATHS = (
    '<html><head><title>maths</title><script defer src="_static/mathjax/tex-chtml.js"></script></head><body>'
    '<h1 id="top">maths</h1><p>Inline <span class="math notranslate nohighlight">\\(a^2 + b^2\\)</span>, and code '
    '<code>$HOME</code> and <code>\\(</code> are fine.</p>'
    '<div class="math notranslate nohighlight">\\[\\min_{\\pi} \\langle C, \\pi \\rangle\\]</div>'
    '<div class="solution admonition toggle toggle-hidden" id="sol"><p class="admonition-title">Solution</p>'
    '<section><p>Hidden answer.</p></section></div>'
    '<style>.toggle-hidden .admonition-title ~ * {height: 0; visibility: hidden; display: block}</style>'
    '<div class="kpl-encoder-banner"><b>Encoder: UNTRAINED stand-in</b> numbers mean nothing</div>'
    '<p>With the <strong>untrained stand-in</strong>, a real checkpoint would show more; the untrained stand-in '
    'runs every line.</p>'
    '<table><caption>Encoder: UNTRAINED stand-in</caption><tr><td>0.5</td></tr></table></body></html>'
)
# Each defect the check promises to catch, on one page (wide boxes are 300 px containers holding 900 px content).
_BAD_MATHS = (
    '<html><head><title>bad maths</title><script src="https://cdn.example.org/mathjax/tex-chtml.js"></script>'
    '</head><body><h1>bad maths</h1><p>Unparsed $x^2$ and $$y$$ and \\(z\\) in prose.</p>'
    '<span class="math notranslate nohighlight">\\(q\\)</span>'
    '<div class="solution admonition" id="shown"><p class="admonition-title">Solution</p>'
    '<section><p>Answer in plain sight.</p></section></div>'
    '<div style="width:300px"><div class="highlight"><pre style="overflow:auto">' + "x = 1  # " + "y" * 200
    + '</pre></div></div>'
    '<div style="width:300px"><table><tr>' + "<td>column_with_a_long_name</td>" * 12 + '</tr></table></div>'
    '<div class="kpl-encoder-banner">Encoder: UNTRAINED stand-in</div>'
    '<div class="kpl-encoder-banner">Encoder: UNTRAINED stand-in</div>'
    '<div class="cell_output"><pre>WARNING USING THE UNTRAINED STAND-IN ENCODER</pre></div>'
    '<p><strong>The numbers below come from the stand-in.</strong></p>'
    '<p>These stand-in accuracies mean nothing at all.</p></body></html>'
)


@pytest.mark.xdist_group("browser")
def test_browser_check_maths_overflow_offline_and_standin(tmp_path):
    """MathJax served locally renders and passes; raw TeX, a CDN script, unrendered maths, a visible solution,
    overflowing code and tables, and the stand-in announced again outside the banner are each reported."""
    _require_mathjax()
    browser_check = _load_browser_check()
    shutil.copytree(MATHJAX.parent, tmp_path / "_static" / "mathjax")
    (tmp_path / "index.html").write_text("<html><body><h1>index</h1></body></html>")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "good.html").write_text(_GOOD_MATHS.replace('"_static/', '"../_static/'))
    (tmp_path / "notebooks" / "bad.html").write_text(_BAD_MATHS)
    report = browser_check.check_site(tmp_path, tmp_path / "shots")
    pages = {p.page: p for p in report.pages}
    assert pages["notebooks/good.html"].problems == [], pages["notebooks/good.html"].problems
    assert pages["notebooks/good.html"].maths == 2
    problems = "\n".join(pages["notebooks/bad.html"].problems)
    assert "MathJax did not load" in problems
    assert "request to another host" in problems and "cdn.example.org" in problems
    for raw in ("$x^2$", "$$y$$", "\\(z\\)"):
        assert raw in problems, raw
    assert "solution visible without opening it" in problems and "shown" in problems
    overflow = [p for p in pages["notebooks/bad.html"].problems if p.startswith("horizontal overflow")]
    assert any("pre" in p and "300 px box" in p for p in overflow), overflow
    assert any("table" in p and "300 px container" in p for p in overflow), overflow
    assert "2 encoder banners" in problems
    standin = [p for p in pages["notebooks/bad.html"].problems if p.startswith("stand-in announced")]
    assert len(standin) >= 3 and any("USING THE UNTRAINED" in p for p in standin), standin
    assert any("bold" in p for p in standin) and any("mean nothing" in p for p in standin), standin


@pytest.mark.slow
@pytest.mark.xdist_group("browser")
def test_exercise_with_gated_code_solution_executes_and_collapses(tmp_path):
    """sphinx-exercise on this Jupyter Book: a {solution-start}/{solution-end} pair around a code cell executes
    the code in the build and renders the solution collapsed; equations in prose, in the exercise and in a Markdown
    output (nb_render_markdown_format: myst) render offline."""
    import nbformat

    _require_mathjax()
    src = tmp_path / "book_src"
    _copy_sources(src)
    shutil.rmtree(src / "notebooks")
    (src / "notebooks").mkdir()
    (src / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/scratch\n")
    (src / "book" / "intro.md").write_text("# Intro\n\nThe objective $\\min_x f(x)$.\n")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Scratch\n\n## Exercises\n\n```{exercise}\n:label: ex-square\n\n"
                                      "Compute $3^2 + 1000$ in code.\n```"),
        nbformat.v4.new_markdown_cell("```{solution-start} ex-square\n```\nSquare it:"),
        nbformat.v4.new_code_cell("print(3**2 + 1000)"),
        nbformat.v4.new_markdown_cell("```{solution-end}\n```"),
        nbformat.v4.new_code_cell('from IPython.display import Markdown\nMarkdown("An output with $x_1$.")'),
    ]
    nbformat.write(nb, src / "notebooks" / "scratch.ipynb")
    _build(src, timeout=600)
    html = src / "_build" / "html"
    page = (html / "notebooks" / "scratch.html").read_text()
    solution = page[page.index('class="solution admonition"'):]
    assert "print" in solution and "1009" in solution, "the gated solution's code cell was not executed inside it"
    report = _load_browser_check().check_site(html, tmp_path / "shots")
    assert report.ok, report.summary()
    pages = {p.page: p for p in report.pages}
    assert pages["notebooks/scratch.html"].maths == 2 and pages["book/intro.html"].maths == 1


@pytest.mark.xdist_group("browser")
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
