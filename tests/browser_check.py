"""Real-browser check of the built book: headless Chromium opens every page and looks for what a reader would see.

Fails on: images that did not load (``naturalWidth == 0``), error outputs left in a page (stderr streams, tracebacks,
Sphinx/docutils error messages), links to local pages or anchors that do not exist, and local CSS/JS/image files
that are missing. Saves one full-page screenshot per page.

Usage (also what ``tests/test_book.py`` calls)::

    .venv/bin/python tests/browser_check.py _build/html --screenshots artifacts/screenshots

Needs Debian's ``chromium`` and ``chromium-driver``:
``apt-get update && apt-get install -y chromium chromium-driver``. Works offline: pages are served from
127.0.0.1; requests to other hosts (e.g. a MathJax CDN) fail quietly and are only listed.
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
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1000",
)
SKIP_DIRS = ("_static", "_sources", "_images", "_sphinx_design_static", ".doctrees", "_panels_static")
# What counts as an error output in a myst-nb page: stderr streams, tracebacks, docutils system messages.
ERROR_SELECTOR = (
    "div.output.stderr, div.output.traceback, div.output.error, div[class*='stderr'], div[class*='traceback'], "
    ".system-message, div.problematic, span.problematic"
)
MAX_SCREENSHOT_HEIGHT = 12000

_PAGE_JS = r"""
const imgs = Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}));
const errs = Array.from(document.querySelectorAll(arguments[0])).map(e => (e.className + ': ' + e.innerText).slice(0, 300));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
const res = Array.from(document.querySelectorAll('link[href], script[src]')).map(e => e.href || e.src);
const ids = Array.from(document.querySelectorAll('[id]')).map(e => e.id);
return {imgs, errs, links, res, ids, height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
        title: document.title};
"""


@dataclass
class PageReport:
    page: str
    title: str = ""
    images: int = 0
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
            lines.append(f"  {p.page}: {p.images} images, {status}, screenshot {p.screenshot}")
        lines += [f"  PROBLEM {msg}" for msg in self.problems]
        if self.external:
            lines.append(f"  external resources not checked (offline): {len(self.external)}")
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
    service = Service(executable_path=driver_path, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    return driver


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
            url = urljoin(base, page)
            driver.set_window_size(1280, 1000)
            driver.get(url)
            for _ in range(100):          # wait until every image finished loading (or failed)
                if driver.execute_script(
                    "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
                ):
                    break
                time.sleep(0.1)
            info = driver.execute_script(_PAGE_JS, ERROR_SELECTOR)
            pr.title = info["title"]
            pr.images = len(info["imgs"])
            for img in info["imgs"]:
                if not img["ok"]:
                    pr.problems.append(f"image did not load: {img['src']}")
            for err in info["errs"]:
                pr.problems.append(f"error output in page: {err!r}")
            page_ids = set(info["ids"])
            for href in info["links"] + info["res"]:
                if not href:
                    continue
                scheme = urlparse(href).scheme
                if scheme in ("mailto", "javascript", "data", "blob"):
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
            if shots:
                height = min(int(info["height"]) + 50, MAX_SCREENSHOT_HEIGHT)
                driver.set_window_size(1280, max(height, 600))
                time.sleep(0.2)
                name = page[: -len(".html")].replace("/", "__") + ".png"
                driver.save_screenshot(str(shots / name))
                pr.screenshot = str(shots / name)
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
