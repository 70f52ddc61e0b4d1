"""Run the README's `sovereign serve` until it answers, then stop it (CI cannot wait for Ctrl-C).

    python scripts/ci_serve_check.py sovereign serve [ARGS...]

Exits 0 once /health is ok, the default model answered a question and stopped by itself, and a
browser's GET / gets the chat page; non-zero (with the server's output) if it never gets there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

URL = "http://127.0.0.1:11800"
READY_TIMEOUT_S = 900  # the first run pulls the default model


def _get(path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(URL + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def _chat_page_served() -> bool:
    """The address serve prints for a browser gives the page, and the page's script comes from the package."""
    page = urllib.request.Request(URL + "/", headers={"accept": "text/html"})
    with urllib.request.urlopen(page, timeout=60) as response:
        html = response.read().decode()
    with urllib.request.urlopen(URL + "/ui/js/main.js", timeout=60) as response:
        script_ok = response.status == 200
    served = '<textarea id="input"' in html and script_ok
    print(f"ci_serve_check: the chat page at {URL}/ was {'served' if served else 'NOT served'}")
    return served


def main() -> int:
    server = subprocess.Popen(sys.argv[1:])
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                print(f"ci_serve_check: the server exited with {server.returncode}", file=sys.stderr)
                return 1
            try:
                status, health = _get("/health")
            except OSError:
                status, health = 0, {}
            if status == 200:
                model = health["models"][0]
                question = {"role": "user", "content": "What is 2+2?"}
                status, reply = _get(
                    "/v1/chat/completions",
                    {"model": model, "messages": [question], "max_tokens": 128, "temperature": 0},
                )
                print(f"ci_serve_check: {model} answered {status}: {json.dumps(reply)[:300]}")
                # the default is a chat model: it answers and stops by itself, well before 128 tokens
                choices = reply.get("choices") or [{}]
                answered = status == 200 and choices[0].get("finish_reason") == "stop"
                return 0 if answered and _chat_page_served() else 1
            time.sleep(0.5)
        print("ci_serve_check: the server never became ready", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
