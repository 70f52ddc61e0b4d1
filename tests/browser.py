"""A real headless Chromium for the chat page's tests: Debian's `chromium`, driven by Playwright.

Playwright's own browser download cannot be reached from every machine, so the tests launch the system's
Chromium by path, installing Debian's package first when they may (as root, with apt-get).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def chromium_path() -> str | None:
    """The system Chromium, installed from Debian's package when it is missing and this process may install it."""
    found = next((path for path in CHROMIUM_PATHS if Path(path).exists()), None)
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(command, env=environment, capture_output=True, timeout=900).returncode != 0:
            return None
    return next((path for path in CHROMIUM_PATHS if Path(path).exists()), None)


def leaves_loopback(url: str) -> bool:
    """Whether a request the page made goes anywhere but this machine (data: and blob: URLs stay in the page)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return False
    return (parts.hostname or "") not in LOOPBACK_HOSTS
