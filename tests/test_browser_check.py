"""Tests for avss_lib.testing.browser_check on tiny hand-written HTML sites.

The browser tests need Chromium (scripts/install_browser.sh) and the playwright package. Without them they
are skipped locally, but fail when the CI environment variable is set, so CI cannot silently skip them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import pytest

from avss_lib.testing.browser_check import check_book, chromium_path, html_pages, main

# A valid 1x1 GIF.
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


@pytest.fixture
def chromium() -> None:
    """Skip (locally) or fail (under CI) when the browser or its driver is missing."""
    missing = []
    if not chromium_path().is_file():
        missing.append(f"Chromium at {chromium_path()} (run scripts/install_browser.sh)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -r requirements.txt)")
    if missing:
        reason = "browser check needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is an error, not a skip")
        pytest.skip(reason)


def page(body: str, title: str = "t") -> str:
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>{body}</body></html>"


def write_site(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def good_files() -> dict[str, str | bytes]:
    """A small book-like site with nothing wrong in it."""
    return {
        "index.html": '<meta http-equiv="Refresh" content="0; url=intro.html" />',
        "intro.html": page(
            '<a href="claims.html">claims</a> <a href="claims.html#sec-1">section</a> '
            '<a href="sub/deep.html">deep</a> <a href="#top">top</a> <a href="#">js button</a> '
            '<a href="https://example.org/x">external</a> <a href="mailto:a@b.c">mail</a> '
            '<a href="_sources/intro.md">source</a> <img src="https://cdn.example.invalid/logo.png" alt="external">'
        ),
        "claims.html": page(
            '<h1 id="claims">Claims</h1><section id="sec-1"><a name="old-anchor"></a>'
            '<figure id="fig-1"><img src="_images/fig%201.gif" alt="fig"><figcaption>Fig</figcaption></figure>'
            '<div class="cell_output"><div class="output stream"><pre>all fine</pre></div></div>'
            '<div class="cell_output"><div class="output stderr"><pre>a harmless warning</pre></div></div>'
            '<a href="intro.html">back</a> <a href="claims.html#old-anchor">old</a></section>'
        ),
        "sub/deep.html": page('<img src="../_images/fig%201.gif"> <a href="../claims.html#claims">up</a>'),
        "_images/fig 1.gif": PIXEL,
        "_sources/intro.md": "# Intro",
        # skipped pages: their problems must not be reported
        "genindex.html": page('<a href="nowhere.html">x</a>'),
        "search.html": page('<img src="missing.png">'),
        "_static/junk.html": page('<img src="missing.png">'),
    }


def test_html_pages_skips_generated_and_static_pages(tmp_path: Path) -> None:
    site = write_site(tmp_path, good_files())
    assert [p.relative_to(site).as_posix() for p in html_pages(site)] == [
        "claims.html",
        "index.html",
        "intro.html",
        "sub/deep.html",
    ]


def test_good_site_has_no_problems_and_gets_a_screenshot(chromium: None, tmp_path: Path) -> None:
    site = write_site(tmp_path / "html", good_files())
    shot = tmp_path / "out" / "claims.png"
    assert check_book(site, screenshot_path=shot) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sub/deep.html": page('<img src="../_images/gone.png">')}, ["sub/deep.html: image did not load"]),
        ({"intro.html": page('<a href="claims-old.html">x</a>')}, ["intro.html: broken link 'claims-old.html'"]),
        ({"sub/deep.html": page('<a href="../claims.html#nowhere">x</a>')}, ["no element with id 'nowhere'"]),
        ({"intro.html": page('<a href="#missing-here">x</a>')}, ["intro.html: broken link '#missing-here'"]),
        ({"index.html": '<meta http-equiv="refresh" content="0; url=start.html">'}, ["index.html: redirect"]),
        ({"claims.html": page('<figure><figcaption>lost</figcaption></figure>')}, ["figure without an image"]),
        (
            {"claims.html": page('<div class="cell_output"><div class="output traceback"><pre>Traceback\n'
                                 'ZeroDivisionError: division by zero</pre></div></div>')},
            ["claims.html: cell output has an error traceback: 'ZeroDivisionError: division by zero'"],
        ),
        (
            {"claims.html": page('<div class="cell_output"><div class="output stderr"><pre>'
                                 'ValueError: bad</pre></div></div>')},
            ["cell stderr mentions Error"],
        ),
        ({"claims.html": page("<script>undefinedFunction();</script>")}, ["claims.html: JavaScript error"]),
        ({"claims.html": page("<script>console.error('boom')</script>")}, ["claims.html: console error: boom"]),
    ],
    ids=["missing-image", "broken-link", "missing-anchor", "missing-local-anchor", "broken-redirect",
         "empty-figure", "traceback", "stderr-error", "js-exception", "console-error"],
)
def test_problem_is_found(chromium: None, tmp_path: Path, change: dict[str, str], expected: list[str]) -> None:
    site = write_site(tmp_path, {**good_files(), **change})
    problems = check_book(site)
    for fragment in expected:
        assert any(fragment in p for p in problems), f"{fragment!r} not in {problems}"


def test_known_template_js_errors_are_ignored(chromium: None, tmp_path: Path) -> None:
    """Jupyter Book 1.x declares THEBE_JS_URL twice on every page; that must not fail the check."""
    twice = "<script>const THEBE_JS_URL = 'x';</script><script>const THEBE_JS_URL = 'x';</script>"
    files = good_files()
    site = write_site(tmp_path, {**files, "claims.html": str(files["claims.html"]).replace("</body>", twice + "</body>")})
    assert check_book(site) == []
    assert any("THEBE_JS_URL" in p for p in check_book(site, ignore_js=()))


def test_main_exit_codes(chromium: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_site(tmp_path / "good", good_files())
    shot = tmp_path / "claims.png"
    assert main([str(good), "--screenshot", str(shot)]) == 0
    assert shot.is_file()
    bad = write_site(tmp_path / "bad", {**good_files(), "intro.html": page('<img src="nope.png">')})
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "intro.html: image did not load: nope.png" in out
    assert main([str(tmp_path / "absent")]) == 2


def test_works_inside_a_running_event_loop(chromium: None, tmp_path: Path) -> None:
    """As in a Jupyter kernel, where Playwright's sync API refuses to run on the loop's thread."""
    site = write_site(tmp_path, {**good_files(), "intro.html": page('<img src="nope.png">')})

    async def inside_loop() -> list[str]:
        return check_book(site)

    problems = asyncio.run(inside_loop())
    assert any("intro.html: image did not load: nope.png" in p for p in problems), problems
