"""The chat page's files as shipped: vendored libraries unchanged from their packages, nothing from elsewhere."""

from __future__ import annotations

import hashlib
import re

from sovereign.server.chat_page import WEBUI_DIR, load_files

VENDOR = WEBUI_DIR / "vendor"


def test_vendored_files_are_the_packages_own() -> None:
    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", (VENDOR / "README.md").read_text(), re.MULTILINE)
    shipped = {path.name for path in VENDOR.iterdir() if path.is_file() and path.name != "README.md"}
    assert {name for _, name in listed} == shipped
    for digest, name in listed:
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert sorted(p.name for p in (VENDOR / "licenses").iterdir()) == [
        "dompurify.LICENSE",
        "highlight.js.LICENSE",
        "markdown-it.LICENSE",
    ]


def test_our_code_names_no_other_host() -> None:
    """No URL in the page's own files points off the machine (the vendored ones only name their homepages)."""
    ours = {name: f for name, f in load_files().items() if not name.startswith("vendor/")}
    assert {"index.html", "app.css", "js/main.js", "icon.svg"} <= set(ours)
    for name, file in ours.items():
        text = file.body.decode()
        urls = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text)
        assert [u for u in urls if u != "http://www.w3.org"] == [], name  # an SVG namespace is a name, not a fetch
