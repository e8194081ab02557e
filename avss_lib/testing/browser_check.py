"""Open every page of a built HTML book in headless Chromium and report what is broken.

:func:`check_book` serves the book folder on a free localhost port, visits each ``.html`` page
(skipping ``genindex``, ``search``, ``_static`` and ``_sources``) and returns human-readable problems:

* an ``<img>`` that did not load (``naturalWidth == 0``) or any local resource answered with HTTP >= 400;
* a ``<figure>`` with no image in it;
* a notebook cell output holding an error traceback, or stderr that mentions ``Error``;
* docutils/Sphinx error markup left in the page (``.system-message``, ``.problematic``);
* an internal link (``<a href>``) to a file that does not exist, or to a ``#anchor`` with no such ``id``
  (or ``<a name>``) on the target page;
* a JavaScript error raised by the page itself (uncaught exceptions and ``console.error``).

Host names other than ``127.0.0.1`` fail to resolve at once, so the check never touches the network and
is not slowed by CDN time-outs; failures of such requests are not reported.

Run it as ``python -m avss_lib.testing.browser_check _build/html --screenshot _build/claims.png``; it exits 1 and
lists the problems when there are any. Chromium comes from ``scripts/install_browser.sh`` (Debian's
``chromium`` package); set ``AVSS_CHROMIUM`` to use another binary. The driver is the ``playwright``
Python package, launched on that binary (``playwright install`` is never needed).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

if TYPE_CHECKING:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Page,
        Playwright,
        Request,
        Response,
    )

CHROMIUM_ENV = "AVSS_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_NAMES = frozenset({"genindex.html", "search.html"})
SKIP_DIRS = frozenset({"_static", "_sources"})
PAGE_TIMEOUT_MS = 30_000
# JavaScript errors that the Jupyter Book 1.x page templates raise on every page; not ours to fix.
KNOWN_BENIGN_JS: tuple[str, ...] = (
    # jupyter-book 1.0.x emits sphinx-thebe's `const THEBE_JS_URL = ...` config <script> twice per page.
    "Identifier 'THEBE_JS_URL' has already been declared",
    # pydata-sphinx-theme (0.15-0.17) console.error()s on the first visit, while localStorage has no mode yet.
    "Got invalid theme mode",
)
_META_REFRESH = re.compile(
    r"""<meta\s+http-equiv=["']?refresh["']?\s+content=["']\s*\d+\s*;\s*url=([^"'>]+)""", re.IGNORECASE
)

# Runs in the page once it has loaded; returns everything the Python side checks.
_PAGE_PROBE = """
async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => (i.complete ? null : new Promise(r => {
    i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, 10000);
  }))));
  const local = u => { try { const x = new URL(u, location.href);
    return x.origin === location.origin || x.protocol === 'data:'; } catch (e) { return false; } };
  const snippet = el => {
    const lines = ((el.querySelector('pre') || el).textContent || '').split('\\n').filter(s => s.trim());
    return (lines.filter(s => /Error|Exception/.test(s)).slice(-1)[0] || lines.slice(-1)[0] || '').trim();
  };
  return {
    brokenImages: imgs.filter(i => local(i.currentSrc || i.src) && i.naturalWidth === 0)
                      .map(i => i.getAttribute('src') || '(no src)'),
    emptyFigures: Array.from(document.querySelectorAll('figure, div.figure'))
                      .filter(f => !f.querySelector('img, svg, object, embed, video, canvas, iframe'))
                      .map(f => f.id || (f.textContent || '').trim().slice(0, 60)),
    tracebacks: Array.from(document.querySelectorAll('.cell_output .traceback'))
                      .map(snippet),
    stderr: Array.from(document.querySelectorAll('.cell_output .stderr'))
                      .filter(e => /Error/.test(e.textContent || '')).map(snippet),
    markup: Array.from(document.querySelectorAll('.system-message, .problematic'))
                      .map(e => (e.textContent || '').trim().slice(0, 80)),
    links: Array.from(document.querySelectorAll('a[href]'))
                      .map(a => ({raw: a.getAttribute('href'), abs: a.href})),
  };
}
"""


def chromium_path() -> Path:
    """The Chromium binary to drive: ``$AVSS_CHROMIUM`` or ``/usr/bin/chromium``."""
    return Path(os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM)


def html_pages(html_dir: Path) -> list[Path]:
    """Every ``.html`` page under ``html_dir`` that the check visits, sorted."""
    return sorted(
        p
        for p in html_dir.rglob("*.html")
        if p.name not in SKIP_NAMES and not SKIP_DIRS.intersection(p.relative_to(html_dir).parts)
    )


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _serve(html_dir: Path) -> Iterator[str]:
    """Serve ``html_dir`` on a free 127.0.0.1 port in a thread; yields the base URL (ends in ``/``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(html_dir)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="browser-check-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _IdCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value is not None and (key == "id" or (key == "name" and tag == "a")):
                self.ids.add(value)


@functools.cache
def _ids_in(path: Path) -> frozenset[str]:
    parser = _IdCollector()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def _link_problem(html_dir: Path, base: str, raw: str, absolute: str) -> str | None:
    """Why the link ``raw`` (resolved to ``absolute``) is broken, or ``None`` if it is fine or external."""
    if not absolute.startswith(base):
        return None  # another host, mailto:, javascript:, ...
    parts = urlsplit(absolute)
    target = html_dir / unquote(parts.path).lstrip("/")
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"broken link {raw!r}: {target.relative_to(html_dir).as_posix()} does not exist"
    anchor = unquote(parts.fragment)
    if not anchor or anchor.lower() == "top" or target.suffix != ".html":
        return None
    if anchor not in _ids_in(target.resolve()):
        return f"broken link {raw!r}: no element with id {anchor!r} in {target.relative_to(html_dir).as_posix()}"
    return None


def _redirect_target(path: Path) -> str | None:
    """The URL of a small redirect-only page's ``<meta http-equiv="refresh">``, else ``None``."""
    if path.stat().st_size > 2000:
        return None
    match = _META_REFRESH.search(path.read_text(encoding="utf-8", errors="replace"))
    return match.group(1).strip() if match else None


def _watch(page: Page, base: str, ignore_js: Sequence[str], events: list[str]) -> None:
    """Append the page's network failures and JavaScript errors to ``events`` as they happen."""

    def js_problem(text: str) -> None:
        if not any(known in text for known in ignore_js):
            events.append(text)

    def on_response(response: Response) -> None:
        if response.url.startswith(base) and response.status >= 400 and not response.url.endswith("/favicon.ico"):
            events.append(f"HTTP {response.status} for {response.url[len(base) - 1:]}")

    def on_request_failed(request: Request) -> None:
        if request.url.startswith(base) and "ERR_ABORTED" not in (request.failure or ""):  # not cancellations
            events.append(f"request failed for {request.url[len(base) - 1:]}: {request.failure}")

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type != "error" or msg.text.startswith("Failed to load resource"):
            return  # network failures: local ones are reported by on_response, external ones ignored
        url = (msg.location or {}).get("url") or ""
        if not url or url.startswith(base):
            js_problem(f"console error: {msg.text}")

    page.on("response", on_response)
    page.on("requestfailed", on_request_failed)
    page.on("console", on_console)
    page.on("pageerror", lambda err: js_problem(f"JavaScript error: {err}"))


def _check_page(page: Page, events: list[str], html_dir: Path, base: str, rel: str) -> list[str]:
    """Load ``rel`` in ``page`` (watched into ``events``); return its problems, without the ``rel:`` prefix."""
    events.clear()
    try:
        page.goto(base + rel, wait_until="load", timeout=PAGE_TIMEOUT_MS)
        found: dict[str, Any] = page.evaluate(_PAGE_PROBE)
    except Exception as exc:  # noqa: BLE001 - a page that will not load is a problem, not a crash
        return [*events, f"could not load page: {exc}"]
    problems = list(events)
    problems += [f"image did not load: {src}" for src in found["brokenImages"]]
    problems += [f"figure without an image: {what!r}" for what in found["emptyFigures"]]
    problems += [f"cell output has an error traceback: {line!r}" for line in found["tracebacks"]]
    problems += [f"cell stderr mentions Error: {line!r}" for line in found["stderr"]]
    problems += [f"Sphinx error markup in page: {text!r}" for text in found["markup"]]
    for link in found["links"]:
        problem = _link_problem(html_dir, base, link["raw"], link["abs"])
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def _launch(playwright: Playwright) -> Browser:
    exe = chromium_path()
    if not exe.is_file():
        raise FileNotFoundError(f"Chromium not found at {exe}: run scripts/install_browser.sh or set {CHROMIUM_ENV}")
    # Every host name except 127.0.0.1 fails to resolve at once: no network, no CDN time-outs.
    offline = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"
    return playwright.chromium.launch(executable_path=str(exe), headless=True, args=[*CHROMIUM_ARGS, offline])


def check_book(
    html_dir: Path,
    *,
    screenshot_page: str | None = "claims.html",
    screenshot_path: Path | None = None,
    ignore_js: Sequence[str] = KNOWN_BENIGN_JS,
) -> list[str]:
    """Open every page of the built book in ``html_dir`` in headless Chromium; return the problems found.

    An empty list means every page loaded with all its images, figures, internal links and anchors intact,
    no error output in notebook cells and no JavaScript errors. Each problem starts with its page's path.
    When ``screenshot_page`` (a path relative to ``html_dir``) exists and ``screenshot_path`` is given, a
    full-page PNG screenshot of it is saved there. JavaScript errors containing any of ``ignore_js`` are
    not reported (default: the template bugs in :data:`KNOWN_BENIGN_JS`). A redirect-only page (a
    ``<meta http-equiv="refresh">`` such as Jupyter Book's ``index.html``) is not opened; only its target
    is checked to exist.

    Raises ``NotADirectoryError`` if ``html_dir`` is not a folder and ``FileNotFoundError`` if Chromium is
    missing (the message names the fix).

    Safe to call where an asyncio loop is running (a Jupyter kernel): the Playwright sync API, which
    refuses to run there, is then driven from a worker thread.
    """
    kwargs: dict[str, Any] = {
        "screenshot_page": screenshot_page,
        "screenshot_path": screenshot_path,
        "ignore_js": ignore_js,
    }
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _check_book(Path(html_dir), **kwargs)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_check_book, Path(html_dir), **kwargs).result()


def _check_book(
    html_dir: Path, *, screenshot_page: str | None, screenshot_path: Path | None, ignore_js: Sequence[str]
) -> list[str]:
    """:func:`check_book` in the calling thread."""
    from playwright.sync_api import sync_playwright

    html_dir = Path(html_dir).resolve()
    if not html_dir.is_dir():
        raise NotADirectoryError(f"{html_dir} is not a folder: build the book first (jupyter-book build)")
    pages = html_pages(html_dir)
    if not pages:
        return [f"no HTML pages found under {html_dir}"]
    _ids_in.cache_clear()
    problems: list[str] = []
    with _serve(html_dir) as base, sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            events: list[str] = []
            _watch(page, base, ignore_js, events)
            for path in pages:
                rel = path.relative_to(html_dir).as_posix()
                redirect = _redirect_target(path)
                if redirect is not None:
                    problem = _link_problem(html_dir, base, redirect, urljoin(base + rel, redirect))
                    problems += [f"{rel}: redirect {problem}"] if problem else []
                    continue
                problems += [f"{rel}: {p}" for p in _check_page(page, events, html_dir, base, rel)]
                if screenshot_path is not None and rel == screenshot_page:
                    Path(screenshot_path).parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshot_path), full_page=True)
        finally:
            browser.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m avss_lib.testing.browser_check HTML_DIR [--screenshot PNG] [--page claims.html]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path, help="the built book, e.g. _build/html")
    parser.add_argument("--screenshot", type=Path, default=None, help="save a full-page PNG of --page here")
    parser.add_argument("--page", default="claims.html", help="page to screenshot (default: claims.html)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        problems = check_book(args.html_dir, screenshot_page=args.page, screenshot_path=args.screenshot)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_pages = len(html_pages(args.html_dir.resolve()))
    if args.screenshot is not None and not (args.html_dir / args.page).is_file():
        print(f"note: {args.page} not found, no screenshot saved", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.html_dir}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"ok: {n_pages} pages checked in {time.perf_counter() - start:.1f}s, no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
