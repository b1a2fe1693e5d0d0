"""Debian's Chromium driven by Playwright for Python (headless), for browser-login tests.
Playwright's own browser download does not work on these machines: the system ``chromium``
package is used instead (``make system-deps`` installs it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

from playwright.async_api import Page, async_playwright

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMIUM_ARGS: Final = (
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# Screenshots and other artifacts of browser tests (gitignored); CI can upload the directory.
ARTIFACTS: Final = Path(__file__).resolve().parents[2] / "test-artifacts"


def missing_chromium() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.is_file():
        return f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


@asynccontextmanager
async def chromium_page(limit: float) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one page; every Playwright wait is bounded by
    ``limit`` seconds."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=list(CHROMIUM_ARGS),
            timeout=limit * 1000,
        )
        try:
            context = await browser.new_context()
            context.set_default_timeout(limit * 1000)
            context.set_default_navigation_timeout(limit * 1000)
            yield await context.new_page()
        finally:
            await browser.close()
