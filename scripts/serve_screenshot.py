"""The README's pictures of `elmgen serve`: the page over a trained run, driven in headless chromium.

    .venv/bin/python scripts/serve_screenshot.py --model demo/lm [--class Sneaker] [--out docs/img]

Serves the run with this checkout (the browser test's helpers: Debian's chromium through Playwright), generates
a grid of one class and writes serve.png (the Generate tab) and serve-inspect.png (the Inspect tab: the
attention from a cell of the first image, and the tokenizer's reconstruction of test image 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_serve import open_page, pick, start_server  # noqa: E402  (after the path to tests/)

DONE = "document.querySelector('{} textarea').value.startsWith('ok')"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an LM run folder, e.g. demo/lm")
    parser.add_argument("--class", dest="class_name", default="Sneaker", help="the class to generate")
    parser.add_argument("--num", type=int, default=8, help="images in the grid")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder of the PNGs")
    a = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server, base = start_server([a.model])
    try:
        with sync_playwright() as p:
            chromium, page = open_page(p, base, 1000)
            pick(page, "#class", a.class_name)
            page.locator("#num input").fill(str(a.num))
            page.locator("#generate").click()
            page.wait_for_function(DONE.format("#status"), timeout=600_000)
            page.screenshot(path=str(Path(a.out) / "serve.png"), full_page=True)
            page.get_by_role("tab", name="Inspect").click()
            page.locator("#attention").click()
            page.wait_for_function(DONE.format("#inspect-status"), timeout=600_000)
            page.locator("#reconstruct").click()
            page.wait_for_function(DONE.format("#tok-status"), timeout=600_000)
            page.screenshot(path=str(Path(a.out) / "serve-inspect.png"), full_page=True)
            chromium.close()
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
