"""Saves a screenshot of a run's report page with headless Chromium (the README's docs/report.png).

    .venv/bin/python jobs/report.py --output ./labels
    .venv/bin/python scripts/report_screenshot.py ./labels/_report.html docs/report.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# The page's own width (60em) with a margin, and the height of its facts, first charts and the gallery's start.
VIEWPORT = {"width": 1100, "height": 1500}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the report's HTML file")
    parser.add_argument("png", type=Path, help="where to save the screenshot")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(args.page.resolve().as_uri(), wait_until="load")
            args.png.write_bytes(page.screenshot(full_page=False))
        finally:
            browser.close()
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
