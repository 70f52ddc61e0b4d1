"""Screenshots of the chat page for the README (docs/chat.png, docs/chat-phone-dark.png), from a running server.

Run `sovereign serve smollm2:135m`, then: python scripts/chat_page_screenshots.py --url http://127.0.0.1:11800
It asks the model one question at temperature 0 in a fresh browser profile, as a new user would, and
shoots the desktop page in the light theme and the same conversation on a phone-sized screen in the dark one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser import chromium_path

DOCS = Path(__file__).resolve().parent.parent / "docs"
QUESTION = "Write a Python function that checks whether a number is prime, and explain it briefly."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:11800")
    parser.add_argument("--model", default="smollm2:135m")
    args = parser.parse_args()
    executable = chromium_path()
    if executable is None:
        print("no Chromium here (Debian: apt-get install chromium)")
        return 1
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        desktop = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
        page = desktop.new_page()
        page.goto(args.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        page.select_option("#model", args.model)
        page.click("#toggle-settings")
        page.fill("#temperature", "0")
        page.click("#toggle-settings")
        page.fill("#input", QUESTION)
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant .stats:not(:empty)", timeout=300_000)
        page.screenshot(path=str(DOCS / "chat.png"))
        state = page.evaluate(
            "async () => { const store = await import('/ui/js/store.js');"
            " return store.exportJson(await store.allConversations()); }"
        )
        phone = browser.new_context(viewport={"width": 390, "height": 760}, color_scheme="dark", device_scale_factor=1)
        mobile = phone.new_page()
        mobile.goto(args.url + "/")
        mobile.wait_for_selector("body[data-ready=true]")
        mobile.set_input_files(
            "#import-file", files=[{"name": "chat.json", "mimeType": "application/json", "buffer": state.encode()}]
        )
        mobile.wait_for_selector(".conversation-title")
        mobile.get_by_role("button", name="Conversations").click()  # on a phone the list is a drawer
        mobile.click(".conversation-title")
        mobile.wait_for_selector(".sidebar:not(.open)")
        mobile.wait_for_timeout(500)  # the drawer's slide
        mobile.screenshot(path=str(DOCS / "chat-phone-dark.png"))
        browser.close()
    print(f"wrote {DOCS / 'chat.png'} and {DOCS / 'chat-phone-dark.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
