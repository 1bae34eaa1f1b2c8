"""Debian's Chromium, driven by Playwright: for the browser test of `vugen serve` and the README's screenshot.

Playwright's own browser download cannot run here (no internet at run time), so it drives the system Chromium
(`make install-browser`: Debian's `chromium` package) headless, with the flags that keep it off the network: without
them it keeps trying to reach Google's services, which a closed network refuses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_FLAGS", "chromium_path", "launch_chromium"]

CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in a container has no user namespaces for Chromium's sandbox
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def chromium_path() -> Path | None:
    """The Chromium executable: ``VUGEN_CHROMIUM`` if set, else ``chromium`` on the PATH; None when there is none."""
    found = os.environ.get("VUGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return Path(found) if found and Path(found).is_file() else None


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium browser started by ``playwright`` (``sync_playwright()``'s object) from the system's
    executable.

    Raises:
        FileNotFoundError: No Chromium is installed, saying how to install it.
    """
    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("no chromium on the PATH (nor VUGEN_CHROMIUM): `make install-browser` installs it")
    return playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_FLAGS, headless=True)
