"""Real-browser check of the built book: headless Chromium opens every page at 1280 px and looks at what a reader sees.

Fails on (each problem names the page and the element):

- images that did not load (``naturalWidth == 0``); local links, anchors, CSS/JS files that do not exist;
- error output left in a page: stderr streams, tracebacks, Sphinx/docutils error messages;
- any request to another host than the book's own server (a CDN for MathJax, fonts, widgets...): the book must work
  offline. Requests are read from Chromium's network log, so failed ones count too;
- maths: on a page with maths (``.math`` elements), MathJax must be loaded from the book's own ``_static`` and every
  ``.math`` element must hold a rendered ``mjx-container`` without a TeX error (``mjx-merror``); on every page, no raw
  TeX may stay visible outside code: ``$$``, ``\\(``, ``\\)``, ``\\[``, ``\\]`` or ``$...$``;
- exercises: a sphinx-exercise solution (``div.solution``) whose content is visible before the reader opens it;
- horizontal overflow at 1280 px, with every collapsed block opened: a code cell or output (``div.highlight pre``,
  ``.cell_input``, ``.cell_output`` and its ``.output`` blocks), a ``table`` or a display equation (``div.math``)
  whose content is wider than its box (``scrollWidth > clientWidth + 1``) or which is wider than its container;
- the stand-in announced more than once on a chapter page (``notebooks/...``): see ``standin_announcements``.

Saves one full-page screenshot per page, as the reader first sees it (collapsed blocks closed).

Usage (also what ``tests/test_book.py`` calls)::

    .venv/bin/python tests/browser_check.py _build/html --screenshots artifacts/screenshots

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``). Pages are served from 127.0.0.1.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"
WIDTH = 1280
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={WIDTH},1000",
    # Offline like a reader without network: other hosts do not resolve (the request is still logged and reported).
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)
SKIP_DIRS = ("_static", "_sources", "_images", "_sphinx_design_static", ".doctrees", "_panels_static")
# What counts as an error output in a myst-nb page: stderr streams, tracebacks, docutils system messages.
ERROR_SELECTOR = (
    "div.output.stderr, div.output.traceback, div.output.error, div[class*='stderr'], div[class*='traceback'], "
    ".system-message, div.problematic, span.problematic"
)
# Boxes that must fit the page width: code (input and output), outputs, tables, display maths.
OVERFLOW_SELECTOR = "div.highlight pre, .cell_input, .cell_output, .cell_output > .output, table, div.math"
# Text a reader never sees as prose: code, the TeX source MathJax keeps for assistive technology.
CODE_SELECTOR = "pre, code, kbd, samp, script, style, textarea, mjx-container, .highlight"
# Raw TeX left visible: $$...$$, \(...\), \[...\] (or a lone delimiter), or $...$ (a $ followed and preceded by a
# non-space, on one line: "$5 and $10" is not maths).
RAW_TEX = re.compile(
    r"\$\$.{0,300}?\$\$|\\\(.{0,300}?\\\)|\\\[.{0,300}?\\\]|\$\$|\\[()\[\]]|\$[^\s$](?:[^$\n]{0,300}?[^\s$\\])?\$"
)
# The stand-in announcement (see standin_announcements): the capitalised label kplib gives the stand-in encoder
# (case-sensitive: prose may say "the untrained stand-in"), and sentences that say its numbers mean nothing.
BANNER_SELECTOR = ".kpl-encoder-banner"
CHAPTER_PREFIX = "notebooks/"
_MEANINGLESS = r"[^.\n]{0,120}?\b(?:[Mm]ean(?:s|ing)? nothing|meaningless|not (?:a )?results?)\b"
STANDIN_TEXT = re.compile(rf"UNTRAINED(?:{_MEANINGLESS})?|\b[Ss]tand-in\b{_MEANINGLESS}")
BOLD_WARNING_WORDS = 5
STANDIN_EXEMPT = f"{BANNER_SELECTOR}, caption, figcaption, .caption, .cell_input, code.literal, script, style"
MAX_SCREENSHOT_HEIGHT = 12000

_PAGE_JS = r"""
const imgs = Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}));
const errs = Array.from(document.querySelectorAll(arguments[0])).map(e => (e.className + ': ' + e.innerText).slice(0, 300));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
const res = Array.from(document.querySelectorAll('link[href], script[src]')).map(e => e.href || e.src);
const ids = Array.from(document.querySelectorAll('[id]')).map(e => e.id);
const shown = e => {
  const cs = getComputedStyle(e);
  return e.getClientRects().length > 0 && cs.visibility !== 'hidden' && cs.opacity !== '0'
    && e.getBoundingClientRect().height > 0;
};
const solutions = Array.from(document.querySelectorAll('div.solution')).filter(
    s => Array.from(s.children).some(c => !c.classList.contains('admonition-title') && shown(c)))
    .map(s => s.id || s.innerText.slice(0, 60));
return {imgs, errs, links, res, ids, solutions, title: document.title,
        height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
        maths: document.querySelectorAll('.math').length};
"""

# Wait for MathJax's first typesetting pass; report where it came from and what it left unrendered.
_MATHJAX_JS = r"""
const done = arguments[arguments.length - 1];
const report = () => {
  const math = Array.from(document.querySelectorAll('.math'));
  done({version: (window.MathJax && MathJax.version) || null,
        scripts: Array.from(document.scripts).map(s => s.src).filter(s => /mathjax|tex-chtml|tex-svg|tex-mml/i.test(s)),
        unrendered: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.trim().slice(0, 80)),
        errors: Array.from(document.querySelectorAll('mjx-merror, [data-mjx-error]'))
                  .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120)),
        rendered: document.querySelectorAll('mjx-container').length});
};
const started = Date.now();
const poll = () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(report, report);
  } else if (Date.now() - started > 15000) { report(); } else { setTimeout(poll, 100); }
};
poll();
"""

# Open every collapsed block (details, sphinx-togglebutton) so that what it hides is measured too.
_EXPAND_JS = r"""
document.querySelectorAll('details').forEach(d => { d.open = true; });
document.querySelectorAll('.toggle-hidden').forEach(e => e.classList.remove('toggle-hidden'));
"""

_OVERFLOW_JS = r"""
const out = [];
const describe = e => {
  const cls = (typeof e.className === 'string' && e.className) ? '.' + e.className.trim().split(/\s+/).join('.') : '';
  return `${e.tagName.toLowerCase()}${cls} "${e.innerText.trim().replace(/\s+/g, ' ').slice(0, 60)}"`;
};
for (const e of document.querySelectorAll(arguments[0])) {
  if (!e.getClientRects().length) continue;
  const sw = e.scrollWidth, cw = e.clientWidth, w = e.getBoundingClientRect().width;
  const parent = e.parentElement;
  if (sw > cw + 1) {
    out.push(`${describe(e)}: content ${sw} px wide in a ${cw} px box`);
  } else if (parent && parent.clientWidth > 0 && w > parent.clientWidth + 1) {
    const box = describe(parent).split(' ')[0];
    out.push(`${describe(e)}: ${Math.round(w)} px wide in a ${parent.clientWidth} px container ${box}`);
  }
}
return out;
"""

# Visible text outside the elements of arguments[0] (hidden in place, then restored).
_TEXT_JS = r"""
const hidden = Array.from(document.querySelectorAll(arguments[0])).filter(e => e.style.display !== 'none');
hidden.forEach(e => { e.dataset.kplDisplay = e.style.display; e.style.display = 'none'; });
const text = document.body.innerText;
const bold = Array.from(document.querySelectorAll('strong, b')).filter(e => e.getClientRects().length > 0)
  .map(e => e.innerText);
hidden.forEach(e => { e.style.display = e.dataset.kplDisplay; delete e.dataset.kplDisplay; });
return {text, bold, banners: document.querySelectorAll(arguments[1]).length};
"""


@dataclass
class PageReport:
    page: str
    title: str = ""
    images: int = 0
    maths: int = 0
    screenshot: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class BrowserReport:
    root: str
    pages: list[PageReport] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        return [f"{p.page}: {msg}" for p in self.pages for msg in p.problems]

    @property
    def ok(self) -> bool:
        return bool(self.pages) and not self.problems

    def summary(self) -> str:
        lines = [
            f"browser check of {self.root}: {len(self.pages)} pages, "
            f"{sum(p.images for p in self.pages)} images, {len(self.problems)} problem(s), {self.seconds:.1f} s"
        ]
        for p in self.pages:
            status = "ok" if not p.problems else f"{len(p.problems)} problem(s)"
            lines.append(f"  {p.page}: {p.images} images, {p.maths} maths, {status}, screenshot {p.screenshot}")
        lines += [f"  PROBLEM {msg}" for msg in self.problems]
        if self.external:
            lines.append(f"  external links not followed (offline): {len(self.external)}")
        return "\n".join(lines)


def find_chromium() -> tuple[str, str]:
    """Paths of the chromium binary and chromedriver; raises RuntimeError with the install command when absent."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        raise RuntimeError(f"headless Chromium not found (chromium={binary}, chromedriver={driver}); install it: "
                           f"{INSTALL_HINT}")
    return binary, driver


def list_pages(html_root: Path) -> list[str]:
    """Every built HTML page (relative POSIX paths), without Sphinx's static/source folders."""
    pages = []
    for path in sorted(html_root.rglob("*.html")):
        rel = path.relative_to(html_root)
        if rel.parts[0] in SKIP_DIRS:
            continue
        pages.append(rel.as_posix())
    return pages


def raw_tex(text: str) -> list[str]:
    """Raw TeX in visible prose text: each match with a little context, once."""
    found = []
    for m in RAW_TEX.finditer(text):
        context = " ".join(text[max(m.start() - 25, 0): m.end() + 25].split())
        found.append(f"{m.group()} in «{context}»")
    return list(dict.fromkeys(found))


def standin_announcements(text: str, bold: list[str]) -> list[str]:
    """Places outside the banner that announce the untrained stand-in, on a chapter page.

    A chapter names the stand-in once, by the encoder banner (``.kpl-encoder-banner``, kplib's ``encoder_banner``).
    Counted here, in the text a reader sees outside the banner: the capitalised ``UNTRAINED`` of the stand-in's label
    (log lines, table cells naming the encoder in every row, repeated labels), sentences that say the stand-in's
    numbers "mean nothing" / are "meaningless" / "not results", and bold text of 5 words or more mentioning the
    stand-in (a bold warning; a bold term such as **untrained stand-in** is not one). Not counted:
    the banner itself, figure and table captions (``<caption>``, e.g. pandas ``Styler.set_caption``; ``figcaption``;
    Sphinx ``.caption``), the red captions inside figure images, code cells' source and inline code, and prose that
    mentions the stand-in without repeating the warning.
    """
    found = [text[max(m.start() - 20, 0): m.end() + 20].replace("\n", " ") for m in STANDIN_TEXT.finditer(text)]
    found += [f"bold: {b[:80]}" for b in bold
              if re.search(r"stand-?in", b, re.I) and len(b.split()) >= BOLD_WARNING_WORDS]
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _ids_in(path: Path, cache: dict[Path, set[str]]) -> set[str]:
    if path not in cache:
        text = path.read_text(encoding="utf-8", errors="replace")
        cache[path] = set(re.findall(r'\bid="([^"]+)"', text)) | set(re.findall(r'\bname="([^"]+)"', text))
    return cache[path]


def _local_target(url: str, base: str, html_root: Path) -> Path | None:
    """The file a same-origin URL points to (``None`` for other hosts and non-http schemes)."""
    if not url.startswith(base):
        return None
    rel = unquote(urlparse(url).path)[1:]
    target = html_root / rel
    if rel == "" or rel.endswith("/"):
        target = target / "index.html"
    return target


def _make_driver(user_data_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")   # never let Selenium Manager try to download a driver
    binary, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})   # every request the page makes
    service = Service(executable_path=driver_path, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def _requests(driver) -> list[str]:
    """URLs the page requested since the last call (Chromium's network log, failed requests included)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _check_links(pr: PageReport, info: dict, url: str, base: str, html_root: Path, id_cache, external: set) -> None:
    page_ids = set(info["ids"])
    for href in info["links"] + info["res"]:
        if not href or urlparse(href).scheme in ("mailto", "javascript", "data", "blob"):
            continue
        target = _local_target(href, base, html_root)
        if target is None:
            external.add(href)
            continue
        no_frag, frag = urldefrag(href)
        if not target.exists():
            pr.problems.append(f"broken local link: {href} (no file {target.relative_to(html_root)})")
            continue
        if frag and target.suffix == ".html":
            ids = page_ids if no_frag == url else _ids_in(target, id_cache)
            if unquote(frag) not in ids:
                pr.problems.append(f"broken anchor: {href}")


def _check_maths(driver, pr: PageReport, base: str) -> None:
    mj = driver.execute_async_script(_MATHJAX_JS)
    if not mj["version"]:
        pr.problems.append(f"{pr.maths} maths element(s) but MathJax did not load (scripts: {mj['scripts']})")
        return
    foreign = [s for s in mj["scripts"] if not s.startswith(base + "_static/")]
    if foreign or not mj["scripts"]:
        pr.problems.append(f"MathJax {mj['version']} not loaded from the book's _static: {mj['scripts']}")
    for text in mj["unrendered"]:
        pr.problems.append(f"maths not rendered by MathJax: {text!r}")
    for err in mj["errors"]:
        pr.problems.append(f"MathJax TeX error: {err!r}")


def _look(driver, pr: PageReport, page: str, base: str, html_root: Path, shots, id_cache, external) -> None:
    """Everything checked on one page (already loaded)."""
    url = urljoin(base, page)
    info = driver.execute_script(_PAGE_JS, ERROR_SELECTOR)
    pr.title, pr.images, pr.maths = info["title"], len(info["imgs"]), info["maths"]
    pr.problems += [f"image did not load: {img['src']}" for img in info["imgs"] if not img["ok"]]
    pr.problems += [f"error output in page: {err!r}" for err in info["errs"]]
    pr.problems += [f"solution visible without opening it (not collapsed): {s!r}" for s in info["solutions"]]
    _check_links(pr, info, url, base, html_root, id_cache, external)
    if pr.maths:
        _check_maths(driver, pr, base)
    if shots:
        height = min(int(info["height"]) + 50, MAX_SCREENSHOT_HEIGHT)
        driver.set_window_size(WIDTH, max(height, 600))
        time.sleep(0.2)
        name = page[: -len(".html")].replace("/", "__") + ".png"
        driver.save_screenshot(str(shots / name))
        pr.screenshot = str(shots / name)
    driver.execute_script(_EXPAND_JS)
    pr.problems += [f"horizontal overflow at {WIDTH} px: {o}" for o in driver.execute_script(_OVERFLOW_JS,
                                                                                             OVERFLOW_SELECTOR)]
    prose = driver.execute_script(_TEXT_JS, CODE_SELECTOR, BANNER_SELECTOR)
    pr.problems += [f"raw TeX visible (not rendered): {t}" for t in raw_tex(prose["text"])]
    if page.startswith(CHAPTER_PREFIX):
        seen = driver.execute_script(_TEXT_JS, STANDIN_EXEMPT, BANNER_SELECTOR)
        if seen["banners"] > 1:
            pr.problems.append(f"{seen['banners']} encoder banners ({BANNER_SELECTOR}): one per page")
        pr.problems += [f"stand-in announced outside the banner: {t!r}"
                        for t in standin_announcements(seen["text"], seen["bold"])]
    for req in _requests(driver):
        if urlparse(req).scheme in ("http", "https", "ws", "wss") and not req.startswith(base):
            pr.problems.append(f"request to another host (the book must work offline): {req}")


def check_site(html_root: str | Path, screenshot_dir: str | Path | None = None,
               pages: list[str] | None = None) -> BrowserReport:
    """Open every page of ``html_root`` in headless Chromium and report problems; screenshots go to ``screenshot_dir``."""
    html_root = Path(html_root).resolve()
    if not (html_root / "index.html").is_file():
        raise FileNotFoundError(f"{html_root} has no index.html: build the book first (make book)")
    pages = pages if pages is not None else list_pages(html_root)
    shots = Path(screenshot_dir).resolve() if screenshot_dir else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    report = BrowserReport(root=str(html_root))
    started = time.perf_counter()
    server, base = _serve(html_root)
    user_data = tempfile.mkdtemp(prefix="kpl-chromium-")
    driver = _make_driver(user_data)
    id_cache: dict[Path, set[str]] = {}
    external: set[str] = set()
    try:
        for page in pages:
            pr = PageReport(page=page)
            report.pages.append(pr)
            driver.set_window_size(WIDTH, 1000)
            _requests(driver)                 # drop what the previous page requested
            driver.get(urljoin(base, page))
            for _ in range(100):              # wait until every image finished loading (or failed)
                if driver.execute_script(
                    "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
                ):
                    break
                time.sleep(0.1)
            _look(driver, pr, page, base, html_root, shots, id_cache, external)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(user_data, ignore_errors=True)
    report.external = sorted(external)
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_root", nargs="?", default="_build/html")
    parser.add_argument("--screenshots", default="artifacts/screenshots", help="folder for one PNG per page")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    report = check_site(args.html_root, args.screenshots)
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps({
            "root": report.root, "ok": report.ok, "seconds": report.seconds, "external": report.external,
            "pages": [p.__dict__ for p in report.pages],
        }, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
