"""Opens the built documentation in headless Chromium and saves screenshots (``make docs-check``).

Run after ``make docs``. Checks first that the built HTML holds what the pages promise (the
index's sections, an API entry for every public function, no literal MyST left unparsed), then
renders ``index.html`` and ``api.html`` to ``docs/_build/screenshots/*.png`` for a person to
look at. Chromium is Debian's ``chromium`` package (``apt-get install chromium``); each run
uses a fresh profile, with background networking off.

The pages load MathJax from its CDN, as Sphinx's default (and JAX's and optax's sites) do.
Offline, the docstrings' math would show as raw TeX, so when Debian's ``libjs-mathjax`` is
installed the screenshots are taken of copies of the pages that load that local MathJax
instead; without it they show the TeX source, and this script says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jxent

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "docs" / "_build" / "html"
SHOTS = ROOT / "docs" / "_build" / "screenshots"
PAGES = {"index": "index.html", "api": "api.html"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1600",
    # lets the pages' scripts (MathJax typesetting) run before the screenshot is taken
    "--virtual-time-budget=15000",
]
LOCAL_MATHJAX = Path("/usr/share/javascript/mathjax/MathJax.js")
# Sphinx writes a MathJax 4 configuration script and a deferred CDN <script>.
MATHJAX_CONFIG = re.compile(r"<script>window\.MathJax = [^<]*</script>")
CDN_MATHJAX = re.compile(r'<script defer="defer" src="https://[^"]*mathjax[^"]*">')
# Debian's MathJax is version 2: its configuration is MathJax.Hub.Config, and the theme's
# article container carries the class tex2jax_ignore, so the math divs must be named.
LOCAL_MATHJAX_TAGS = (
    '<script type="text/x-mathjax-config">'
    'MathJax.Hub.Config({tex2jax: {processClass: "math"}});</script>'
    f'<script src="{LOCAL_MATHJAX.as_uri()}?config=TeX-AMS_CHTML">'
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("docs-check: no Chromium found; install Debian's package: apt-get install chromium")


def check_html() -> None:
    """The built pages hold their content: a failed include or autodoc would leave them thin."""
    missing = [page for page in PAGES.values() if not (HTML / page).is_file()]
    if missing:
        sys.exit(f"docs-check: {missing} not in {HTML}; run `make docs` first")
    api = (HTML / "api.html").read_text()
    undocumented = [
        name for name in jxent.__all__ if name != "__version__" and f'id="jxent.{name}"' not in api
    ]
    if undocumented:
        sys.exit(f"docs-check: api.html has no entry for {undocumented}")
    for page in HTML.rglob("*.html"):
        text = page.read_text()
        # MyST syntax that reached the HTML as text means a directive was not parsed
        for leftover in ("```{", "{eval-rst}", ":start-after:"):
            if leftover in text:
                sys.exit(f"docs-check: {page.relative_to(HTML)} shows {leftover!r} literally")


def offline_copy(page: str) -> Path:
    """``page`` itself, or beside it a copy that loads the local MathJax (see the docstring)."""
    original = HTML / page
    if not LOCAL_MATHJAX.is_file():
        return original
    html = MATHJAX_CONFIG.sub("", original.read_text())
    html, found = CDN_MATHJAX.subn(lambda _: LOCAL_MATHJAX_TAGS, html)
    if not found:  # a page without math loads no MathJax
        return original
    copy = original.with_name(f"_offline_{original.name}")
    copy.write_text(html)
    return copy


def screenshot(browser: str, page: str, out: Path) -> None:
    target = offline_copy(page)
    with tempfile.TemporaryDirectory(prefix="jxent-docs-chromium-") as profile:
        command = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            target.as_uri(),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        finally:
            if target != HTML / page:
                target.unlink()
    if result.returncode != 0 or not out.is_file() or out.stat().st_size < 10_000:
        sys.exit(f"docs-check: Chromium made no screenshot of {page}:\n{result.stderr[-2000:]}")


def main() -> None:
    check_html()
    browser = chromium()
    if not LOCAL_MATHJAX.is_file():
        print(f"docs-check: no {LOCAL_MATHJAX} (apt-get install libjs-mathjax): math shows as TeX")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, page in PAGES.items():
        out = SHOTS / f"{name}.png"
        screenshot(browser, page, out)
        print(f"docs-check: {page} -> {out.relative_to(ROOT)} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
