"""The README's screenshot of `vugen serve`: the page over a bundle, after generating from a prompt.

python -m tools.serve_screenshot BUNDLE docs/images/serve.png --prompt "a large red circle on the left"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from tools.browser import launch_chromium
from vugen.serve import ServedBundle, build_app, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompt", default="a large red circle on the left")
    parser.add_argument("--image", type=Path, help="an image to ask the VLM about in the Describe tab (not shown)")
    args = parser.parse_args()
    served = ServedBundle()
    served.load(args.bundle)
    app = build_app(served, args.bundle)
    url = launch(app, "127.0.0.1", None, share=False, block=False)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.goto(url)
            page.locator("#prompt textarea").fill(args.prompt)
            page.locator("#generate").click()
            page.locator("#images img").first.wait_for(timeout=120_000)
            page.wait_for_timeout(500)  # the gallery's layout settles
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
