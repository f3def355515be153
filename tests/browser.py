"""A real headless browser for tests: Debian's Chromium (/usr/bin/chromium, installed by infra/browser/install.sh,
which `make test` runs) driven through Playwright; Playwright's own browser download is never used. A missing browser
fails the test, it is never skipped. Import the `chromium` fixture into a test module."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def chromium():
    """A headless Debian Chromium driven by Playwright (fails, never skips, when either is missing)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run infra/browser/install.sh (`make test` runs it) to install Debian's "
                    "chromium; never `playwright install`", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed in this venv: `pip install -e '.[test]'` (or `make install`)",
                    pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
