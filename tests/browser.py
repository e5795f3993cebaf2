"""A real browser for the status page: Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import contextlib
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/install.sh); Playwright drives it as it is


class Browser:
    """Headless Chromium (Debian's, /usr/bin/chromium) with a fresh profile and no network of its
    own, one page on the fleet's /ui; every console error and page error is kept."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update")

    def __init__(self, url: str, profile: Path) -> None:
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        try:
            self.context = self.playwright.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=list(self.FLAGS))
            self.errors: list[str] = []
            self.page = self.context.new_page()
            self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
            self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
            self.page.goto(url + "/ui")
            self.page.evaluate("window.notReloaded = true")
        except BaseException:
            self.close()
            raise

    def wait_for(self, function: str, timeout: float = 30) -> None:
        """Wait until the page's `function` ("() => ...") returns true. Polled through Playwright's
        evaluate: its wait_for_function evaluates a string in the page, which the page's content
        security policy (script-src 'self') refuses, as it should."""
        from fleets import wait_until

        wait_until(lambda: bool(self.page.evaluate(function)), f"the page: {function}", timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()
        self.playwright.stop()
