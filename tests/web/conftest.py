"""Fixtures of the browser tests: one headless chromium for the package, a fresh
browser context (its own IndexedDB) per test. The tests skip, saying why, only
where chromium or Playwright is not installed."""

from __future__ import annotations

import os

import pytest
from page_helpers import CHROMIUM


@pytest.fixture(scope="package")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[test]' (make install)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium "
                    "(make install does it as root), or set BENTO_CHROMIUM")
    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield ctx
    ctx.close()
