"""The chat page at /, in a real headless Chromium: chat, stop, models, storage, export/import, keys, safety.

Most tests run the page against the fake engine (its answers echo the message, which makes XSS payloads
into model output); the Stop test runs the real model, to see its slot free.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sovereign.engine import ChatRequest, CompletionRequest, Generation
from sovereign.engine.requests import Event
from sovereign.errors import ContextLengthExceeded
from sovereign.server.app import ServerOptions, create_app
from sovereign.server.chat_page import load_files
from tests.browser import chromium_path, leaves_loopback
from tests.conftest import GEMMA, skip_or_fail
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer, ServerProcess

playwright_api = pytest.importorskip("playwright.sync_api")

READY = "body[data-ready=true]"
ANSWERED = ".message.assistant .stats:not(:empty)"


class Recorder:
    """What a page did: every URL it asked for, every dialog it opened, every error it threw."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.confirm = True  # how the page's confirm() dialogs are answered


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        skip_or_fail("no Chromium here (Debian: apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path)
        yield launched
        launched.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(engine: FakeEngine) -> Iterator[InProcessServer]:
    with InProcessServer(create_app(engine, ServerOptions())) as running:
        yield running


def open_page(browser: Any, recorder: Recorder, **context: Any) -> Any:
    """A fresh browser profile (its own IndexedDB and localStorage) whose page records what it does."""
    ctx = browser.new_context(accept_downloads=True, **context)
    # Anything but loopback is refused at the browser, and recorded: the page must never ask.
    ctx.route(lambda url: leaves_loopback(url), lambda route: route.abort())
    page = ctx.new_page()
    page.on("request", lambda request: recorder.urls.append(request.url))
    page.on("pageerror", lambda error: recorder.errors.append(str(error)))

    def on_dialog(dialog: Any) -> None:
        recorder.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm" and recorder.confirm:
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    return page


def open_chat(browser: Any, recorder: Recorder, url: str, **context: Any) -> Any:
    """open_page at the server's /, once the page has drawn what it stores."""
    page = open_page(browser, recorder, **context)
    page.goto(url + "/")
    page.wait_for_selector(READY)
    return page


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    seen = Recorder()
    yield seen
    assert [url for url in seen.urls if leaves_loopback(url)] == [], "the page asked for something off this machine"
    assert seen.errors == [], seen.errors


@pytest.fixture
def page(browser: Any, recorder: Recorder, fake_server: InProcessServer) -> Iterator[Any]:
    opened = open_chat(browser, recorder, fake_server.url)
    yield opened
    opened.context.close()


def wait_until(page: Any, expression: str, timeout: float = 15) -> None:
    """Poll a JavaScript expression until it is true (the page's CSP forbids the eval wait_for_function uses)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {expression}"
        time.sleep(0.05)


def send(page: Any, text: str) -> None:
    """Type a message and press Enter, then wait until its answer is complete."""
    answered = page.locator(ANSWERED).count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_until(
        page,
        f"document.querySelectorAll({ANSWERED!r}).length > {answered} || "
        "document.querySelector('.message.assistant:last-child .message-error') !== null",
    )


def last_answer(page: Any) -> Any:
    return page.locator(".message.assistant").last


# --- HTTP: what the server answers at / and under /ui/ ----------------------------------------


def test_browsers_get_the_page_and_api_clients_keep_their_answer(fake_server: InProcessServer) -> None:
    page = httpx.get(fake_server.url + "/", headers={"Accept": "text/html,*/*", "Accept-Encoding": "gzip"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-encoding"] == "gzip"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<textarea id="input"' in page.text
    api = httpx.get(fake_server.url + "/")  # an SDK or curl: no text/html in Accept
    assert api.json()["name"] == "sovereign" and api.json()["sampling_defaults"]["temperature"] == 0.8
    assert httpx.head(fake_server.url + "/").status_code == 200  # Claude Code's check that its base URL is up


def test_assets_are_cached_by_etag(fake_server: InProcessServer) -> None:
    first = httpx.get(fake_server.url + "/ui/js/main.js")
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/javascript")
    assert first.headers["cache-control"] == "no-cache" and first.headers["x-content-type-options"] == "nosniff"
    again = httpx.get(fake_server.url + "/ui/js/main.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert httpx.get(fake_server.url + "/ui/../app.py").status_code == 404
    assert httpx.get(fake_server.url + "/ui/nothing.js").status_code == 404
    for path in ("/ui/", "/ui/index.html"):  # the page's relative paths work at / only
        moved = httpx.get(fake_server.url + path)
        assert moved.status_code == 307 and moved.headers["location"] == "/"


def test_the_page_fits_its_transfer_budget() -> None:
    """Everything the page can load, gzipped as served: at most 300 KB on a first visit."""
    total = sum(len(file.gzipped) for file in load_files().values())
    assert total <= 300_000, f"{total} bytes gzipped"


def test_an_api_key_guards_the_api_but_not_the_page(engine: FakeEngine) -> None:
    with InProcessServer(create_app(engine, ServerOptions(api_keys=("k-123",)))) as server:
        assert httpx.get(server.url + "/", headers={"Accept": "text/html"}).status_code == 200
        assert httpx.get(server.url + "/ui/js/api.js").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        keyed = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer k-123"})
        assert keyed.status_code == 200


def test_a_page_served_by_this_server_may_call_it_from_any_name_it_answers(engine: FakeEngine) -> None:
    """Bound beyond loopback, the page's origin is the LAN address: the same origin as the Host, so allowed."""
    with InProcessServer(create_app(engine, ServerOptions(allowed_hosts=("*",)))) as server:
        same = {"Host": "192.168.1.20:11800", "Origin": "http://192.168.1.20:11800"}
        assert httpx.get(server.url + "/v1/models", headers=same).status_code == 200
        other = {"Host": "192.168.1.20:11800", "Origin": "http://192.168.1.99:8080"}
        assert httpx.get(server.url + "/v1/models", headers=other).status_code == 403
        for host in ("[fe80::1]:11800", "203.0.113.5:11800", "203.0.113.5", "mybox.local:11800"):  # no DNS to rebind
            assert httpx.get(server.url + "/v1/models", headers={"Host": host, "Origin": "http://" + host}).is_success


def test_dns_rebinding_is_not_the_page_s_own_origin(engine: FakeEngine) -> None:
    """attacker.example rebound to a server that takes any Host: its page is "same-origin", and still refused."""
    rebound = {"Host": "attacker.example:11800", "Origin": "http://attacker.example:11800"}
    chat = {"model": "fake:model", "messages": [{"role": "user", "content": "hi"}]}
    with InProcessServer(create_app(engine, ServerOptions(allowed_hosts=("*",)))) as server:
        refused = httpx.post(server.url + "/v1/chat/completions", headers=rebound, json=chat)
        assert refused.status_code == 403 and "--allowed-hosts attacker.example" in refused.text
        assert engine.requests == []
    with InProcessServer(create_app(engine, ServerOptions(allowed_hosts=("*.example",)))) as server:
        named = httpx.post(server.url + "/v1/chat/completions", headers=rebound, json=chat)
        assert named.status_code == 200  # a name the server was told to answer is its own


# --- the browser ----------------------------------------------------------------------------


def test_a_message_is_answered_in_markdown(page: Any, engine: FakeEngine) -> None:
    send(page, "Hello **bold** and `code`")
    answer = last_answer(page)
    assert answer.locator(".message-content").inner_text() == "You said: Hello bold and code"
    assert answer.locator(".message-content strong").inner_text() == "bold"
    assert "tokens" in answer.locator(".stats").inner_text()
    assert "prompt tokens" in answer.locator(".stats").inner_text()
    assert engine.requests[-1].messages[-1]["content"] == "Hello **bold** and `code`"
    assert page.locator(".conversation-title").first.inner_text() == "Hello **bold** and `code`"


def test_shift_enter_makes_a_new_line_and_enter_sends_once(page: Any, engine: FakeEngine) -> None:
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    page.press("#input", "Enter")
    page.wait_for_selector(ANSWERED)
    assert len(engine.requests) == 1
    assert engine.requests[0].messages[-1]["content"] == "line one\nline two"


def test_reasoning_shows_as_a_thinking_block(page: Any) -> None:
    send(page, "think about tides")
    answer = last_answer(page)
    thinking = answer.locator("details.thinking")
    assert thinking.locator("summary").inner_text() == "Thinking"
    assert thinking.locator(".thinking-body").text_content() == "Thinking about think about tides."
    assert thinking.get_attribute("open") is None  # folded once the answer is in
    assert answer.locator(".message-content").inner_text() == "You said: think about tides"


def test_a_reload_keeps_the_conversations(page: Any) -> None:
    send(page, "first chat")
    page.click("#new-chat")
    send(page, "second chat")
    page.reload()
    page.wait_for_selector(READY)
    titles = page.locator(".conversation-title").all_inner_texts()
    assert titles == ["second chat", "first chat"]
    assert last_answer(page).locator(".message-content").inner_text() == "You said: second chat"
    page.locator(".conversation-title", has_text="first chat").click()
    assert last_answer(page).locator(".message-content").inner_text() == "You said: first chat"


def test_rename_search_and_delete(page: Any, recorder: Recorder) -> None:
    send(page, "about cats")
    page.click("#new-chat")
    send(page, "about dogs")
    page.get_by_label("Rename about dogs").click()
    page.fill(".rename-input", "Dog questions")
    page.press(".rename-input", "Enter")
    page.wait_for_selector(".conversation-title:text-is('Dog questions')")
    page.fill("#search", "dog")
    assert page.locator(".conversation-title").all_inner_texts() == ["Dog questions"]
    page.fill("#search", "")
    page.get_by_label("Delete about cats").click()
    page.wait_for_selector(".conversation-title:text-is('about cats')", state="detached")
    assert recorder.dialogs == ['confirm: Delete "about cats"? This cannot be undone.']
    assert page.locator(".conversation-title").all_inner_texts() == ["Dog questions"]
    page.reload()
    page.wait_for_selector(READY)
    assert page.locator(".conversation-title").all_inner_texts() == ["Dog questions"]


def test_switching_models_and_errors_in_words_with_a_retry(page: Any, engine: FakeEngine) -> None:
    options = page.locator("#model option").all_inner_texts()
    assert any(text.startswith("busy:model (") for text in options)
    page.select_option("#model", "busy:model")
    send(page, "hello")
    error = last_answer(page).locator(".message-error")
    assert "overloaded" in error.inner_text()
    page.select_option("#model", "crashing:model")
    error.get_by_role("button", name="Retry").click()
    wait_until(page, "document.querySelector('.message.assistant:last-child .message-error') !== null")
    assert "crashed" in last_answer(page).locator(".message-error").inner_text()
    page.select_option("#model", "fake:model")
    last_answer(page).get_by_role("button", name="Retry").click()
    page.wait_for_selector(ANSWERED)
    assert last_answer(page).locator(".message-content").inner_text() == "You said: hello"
    assert [r.model for r in engine.requests] == ["crashing:model", "fake:model"]  # busy:model refuses up front
    assert "fake:model (" in page.locator("#model option:checked").inner_text()
    assert "loaded" in page.locator("#model option:checked").inner_text()


def test_regenerate_and_edit_resend(page: Any, engine: FakeEngine) -> None:
    send(page, "one")
    send(page, "two")
    last_answer(page).get_by_role("button", name="Regenerate this answer").click()
    page.wait_for_selector(ANSWERED)
    assert len(engine.requests) == 3 and len(engine.requests[-1].messages) == 3
    page.locator(".message.user").first.get_by_role("button", name="Edit this message and send it again").click()
    page.fill(".edit-area", "uno")
    page.get_by_role("button", name="Save & send").click()
    wait_until(page, "document.querySelectorAll('.message').length === 2")
    page.wait_for_selector(ANSWERED)
    assert last_answer(page).locator(".message-content").inner_text() == "You said: uno"
    assert [m["content"] for m in engine.requests[-1].messages] == ["uno"]


def test_settings_and_system_prompt_reach_the_request(page: Any, engine: FakeEngine) -> None:
    page.click("#toggle-settings")
    assert page.get_attribute("#temperature", "placeholder") == "server default: 0.8"
    assert page.get_attribute("#top_p", "placeholder") == "server default: 0.95"
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0.2")
    page.fill("#max_tokens", "3")
    send(page, "one two three four")
    request = engine.requests[-1]
    assert request.messages[0] == {"role": "system", "content": "Be brief."}
    assert request.sampling.temperature == 0.2 and request.sampling.top_p == 0.95
    assert request.sampling.max_tokens == 3
    assert "cut at max tokens" in last_answer(page).locator(".stats").inner_text()


def test_text_files_are_attached_and_others_refused(page: Any, engine: FakeEngine) -> None:
    page.set_input_files(
        "#attach-file", files=[{"name": "tool.py", "mimeType": "text/x-python", "buffer": b"print('hi')\n"}]
    )
    assert page.locator(".attachment-list.pending .attachment").inner_text().startswith("tool.py")
    page.set_input_files("#attach-file", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": b"\x89PNG"}])
    assert "photo.png is not a text file: these models read text" in page.inner_text("#composer-error")
    send(page, "review this")
    content = engine.requests[-1].messages[-1]["content"]
    assert content == "review this\n\ntool.py:\n```py\nprint('hi')\n\n```"
    assert page.locator(".message.user .attachment").inner_text() == "tool.py"


def test_export_then_import(page: Any, tmp_path: Path) -> None:
    send(page, "keep me")
    with page.expect_download() as download:
        page.click("#export-all")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["format"] == "sovereign-chat" and data["conversations"][0]["messages"][1]["role"] == "assistant"
    page.get_by_label("Delete keep me").click()
    page.wait_for_selector(".conversation-title", state="detached")
    page.set_input_files("#import-file", str(exported))
    page.wait_for_selector(".conversation-title")
    assert page.locator(".conversation-title").all_inner_texts() == ["keep me"]
    page.wait_for_selector("#composer-error.info:has-text('Imported 1 conversation.')")
    page.set_input_files("#import-file", files=[{"name": "x.json", "mimeType": "application/json", "buffer": b"[1]"}])
    page.wait_for_selector("#composer-error:has-text('not a sovereign chat export')")


XSS_PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(2)</script>",
    "<svg onload=alert(3)></svg>",
    "[click](javascript:alert(4))",
    '<a href="javascript:alert(5)">x</a>',
    "![pixel](http://203.0.113.7/track.png)",
    "<iframe src=http://203.0.113.7/></iframe>",
]


def test_model_output_never_runs_as_html(page: Any, recorder: Recorder) -> None:
    send(page, "See [the docs](http://203.0.113.7/docs) " + " ".join(XSS_PAYLOADS))
    content = last_answer(page).locator(".message-content")
    text = content.inner_text()
    for payload in ("<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "<svg onload=alert(3)></svg>"):
        assert payload in text
    assert content.locator("img, script, svg, iframe").count() == 0
    hrefs = content.locator("a").evaluate_all("links => links.map(a => [a.getAttribute('href'), a.rel, a.target])")
    assert ["http://203.0.113.7/docs", "noopener noreferrer", "_blank"] in hrefs
    for href, rel, target in hrefs:  # an image becomes a link (never loaded); no javascript: link survives
        assert href.startswith("http://203.0.113.7/") and rel == "noopener noreferrer" and target == "_blank"
    page.wait_for_timeout(300)  # an onerror or onload would have fired by now
    assert recorder.dialogs == []


def test_the_api_key_is_asked_for_after_a_401(browser: Any, recorder: Recorder, engine: FakeEngine) -> None:
    with InProcessServer(create_app(engine, ServerOptions(api_keys=("k-123",)))) as server:
        page = open_page(browser, recorder)
        page.goto(server.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        assert "API key" in page.inner_text("#key-reason")
        page.fill("#key-input", "k-123")
        page.click("#key-ok")
        page.wait_for_selector(READY)
        assert page.locator("#model option").count() == 3
        send(page, "with a key")
        assert last_answer(page).locator(".message-content").inner_text() == "You said: with a key"
        assert page.evaluate("localStorage.getItem('sovereign.apiKey')") == "k-123"
        page.evaluate("localStorage.setItem('sovereign.apiKey', 'wrong')")  # the key changed on the server
        page.fill("#input", "again")
        page.press("#input", "Enter")
        page.wait_for_selector("#key-dialog[open]")
        assert "Incorrect API key" in page.inner_text("#key-reason")
        page.fill("#key-input", "k-123")
        page.click("#key-ok")
        wait_until(page, "document.querySelectorAll('.message.assistant .stats:not(:empty)').length === 2")
        assert last_answer(page).locator(".message-content").inner_text() == "You said: again"
        page.context.close()


def test_a_phone_sized_screen_gets_a_drawer(browser: Any, recorder: Recorder, fake_server: InProcessServer) -> None:
    page = open_chat(browser, recorder, fake_server.url, viewport={"width": 390, "height": 844}, color_scheme="dark")
    assert not page.locator(".sidebar").evaluate("e => e.getBoundingClientRect().right > 0")
    page.get_by_role("button", name="Conversations").click()
    wait_until(page, "document.querySelector('.sidebar').getBoundingClientRect().left >= 0")
    assert page.get_by_role("button", name="New chat").is_visible()
    page.keyboard.press("Escape")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(22, 26, 24)"  # the dark theme, following the system
    page.context.close()


# --- the real model: Stop frees its slot ------------------------------------------------------


def _busy_slots(server: ServerProcess) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("sovereign_slots_busy{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_stop_cancels_the_answer_and_frees_the_slot(browser: Any, recorder: Recorder, server: ServerProcess) -> None:
    page = open_chat(browser, recorder, server.url)
    page.select_option("#model", GEMMA)
    page.fill("#input", "Count from 1 to 1000: 1, 2, 3, 4,")
    page.press("#input", "Enter")
    wait_until(
        page,
        "document.querySelector('.message.assistant:last-child .message-content').textContent.length > 20",
        timeout=120,  # the first request loads the model
    )
    assert _busy_slots(server) == 1
    page.fill("#input", "sent twice?")
    page.press("#input", "Enter")  # ignored while the answer streams
    assert page.input_value("#input") == "sent twice?"
    page.click("#stop")
    page.wait_for_selector(ANSWERED)
    assert "stopped" in last_answer(page).locator(".stats").inner_text()
    assert page.locator(".message.user").count() == 1
    deadline = time.monotonic() + 5
    while _busy_slots(server) != 0:
        assert time.monotonic() < deadline, "the slot was still busy 5 s after Stop"
        time.sleep(0.1)
    page.context.close()


def test_a_streamed_answer_settles_only_outside_code_fences(page: Any) -> None:
    """The streaming view re-renders only the text after the last blank line that is not inside a fence."""
    cuts = page.evaluate(
        """async () => {
            const { settledEnd } = await import('/ui/js/messages.js');
            return [
                settledEnd('one\\n\\ntwo', 0),
                settledEnd('a\\n\\n```py\\nx = 1\\n\\ny = 2', 0),
                settledEnd('a\\n\\n```py\\nx\\n\\n```\\n\\nb', 0),
                settledEnd('a\\n\\nb\\n\\nc', 3),
            ];
        }"""
    )
    assert cuts == [5, 3, 17, 6]


class SlowLoadingEngine(FakeEngine):
    """The fake engine, whose fake:model is 'loading' (as /health shows it) until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded_now = threading.Event()

    @property
    def loading_names(self) -> list[str]:
        return [] if self.loaded_now.is_set() else ["fake:model"]

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        while not self.loaded_now.is_set():
            await asyncio.sleep(0.05)
        return await super().submit(request)


def test_a_model_still_loading_says_so(browser: Any, recorder: Recorder) -> None:
    engine = SlowLoadingEngine()
    with InProcessServer(create_app(engine, ServerOptions())) as server:
        page = open_chat(browser, recorder, server.url)
        page.fill("#input", "hello")
        page.press("#input", "Enter")
        page.wait_for_selector(".stream-status:has-text('Loading fake:model into memory')")
        engine.loaded_now.set()
        page.wait_for_selector(ANSWERED)
        assert last_answer(page).locator(".message-content").inner_text() == "You said: hello"
        assert last_answer(page).locator(".stream-status").count() == 0
        page.context.close()


class TooLongEngine(FakeEngine):
    """The fake engine with a 4,096-token context that every prompt overflows."""

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        raise ContextLengthExceeded(5000, 4096)


def test_a_prompt_too_long_is_explained_with_both_counts(browser: Any, recorder: Recorder) -> None:
    with InProcessServer(create_app(TooLongEngine(), ServerOptions())) as server:
        page = open_chat(browser, recorder, server.url)
        send(page, "a long paste")
        error = last_answer(page).locator(".message-error").inner_text()
        assert "maximum context length is 4096 tokens" in error and "resulted in 5000 tokens" in error
        assert last_answer(page).get_by_role("button", name="Retry").is_visible()
        page.context.close()


# --- what must not lose a conversation ------------------------------------------------------------


class SlowEngine(FakeEngine):
    """The fake engine, one word every 0.15 s: an answer that is still coming while the test acts."""

    async def _events(self, request: ChatRequest | CompletionRequest, stopped: asyncio.Event) -> AsyncGenerator[Event]:
        async for event in super()._events(request, stopped):
            await asyncio.sleep(0.15)
            yield event


SLOW_QUESTION = " ".join(f"w{n}" for n in range(40))
STREAMING = "document.querySelector('.message.assistant:last-child .message-content').textContent"


def test_a_reload_mid_answer_keeps_the_question_and_what_came(browser: Any, recorder: Recorder) -> None:
    with InProcessServer(create_app(SlowEngine(), ServerOptions())) as server:
        page = open_chat(browser, recorder, server.url)
        page.fill("#input", SLOW_QUESTION)
        page.press("#input", "Enter")
        wait_until(page, f"{STREAMING}.includes('w16')")  # past the first save during the answer (2 s)
        page.reload()
        page.wait_for_selector(READY)
        assert page.locator(".conversation-title").all_inner_texts() == [SLOW_QUESTION[:60]]
        assert page.locator(".message.user .message-content").inner_text() == SLOW_QUESTION
        answer = last_answer(page)
        assert answer.locator(".message-content").inner_text().startswith("You said: w0 w1 w2 w3 w4 w5 w6 w7 w8")
        assert "cut off" in answer.locator(".message-error").inner_text()
        answer.get_by_role("button", name="Retry").click()  # asks again, without the cut-off answer
        wait_until(page, f"{STREAMING}.includes('w3')")
        page.click("#stop")
        page.wait_for_selector(ANSWERED)
        page.context.close()


def test_deleting_the_conversation_mid_answer_stops_it_for_good(browser: Any, recorder: Recorder) -> None:
    with InProcessServer(create_app(SlowEngine(), ServerOptions())) as server:
        page = open_chat(browser, recorder, server.url)
        page.fill("#input", SLOW_QUESTION)
        page.press("#input", "Enter")
        wait_until(page, f"{STREAMING}.includes('w2')")
        page.get_by_label("Delete w0 w1").click()  # the list shows the conversation as soon as it is asked
        page.wait_for_selector("#stop", state="hidden")
        wait_until(page, "document.querySelectorAll('.message').length === 0")
        page.wait_for_timeout(300)
        page.reload()
        page.wait_for_selector(READY)
        assert page.locator(".conversation-title").count() == 0  # the ended answer did not save it back
        page.context.close()


def test_switching_mid_answer_says_why_it_waits(browser: Any, recorder: Recorder) -> None:
    with InProcessServer(create_app(SlowEngine(), ServerOptions())) as server:
        page = open_chat(browser, recorder, server.url)
        page.fill("#input", "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9")
        page.press("#input", "Enter")
        wait_until(page, f"{STREAMING}.includes('w1')")
        page.click("#new-chat")
        assert "still coming" in page.inner_text("#composer-error")
        page.wait_for_selector(ANSWERED)
        assert page.locator("#composer-error").is_hidden()
        page.context.close()


def test_renaming_the_open_conversation_survives_its_next_message(page: Any) -> None:
    send(page, "first")
    send(page, "second")  # the list now holds a copy of the open conversation, read back after the save
    page.get_by_label("Rename first").click()
    page.fill(".rename-input", "Renamed")
    page.press(".rename-input", "Enter")
    page.wait_for_selector(".conversation-title:text-is('Renamed')")
    send(page, "third")
    assert page.locator(".conversation-title").all_inner_texts() == ["Renamed"]
    page.reload()
    page.wait_for_selector(READY)
    assert page.locator(".conversation-title").all_inner_texts() == ["Renamed"]
    assert page.locator(".message.user").count() == 3


def _export(*conversations: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "chats.json",
        "mimeType": "application/json",
        "buffer": json.dumps({"format": "sovereign-chat", "version": 1, "conversations": list(conversations)}).encode(),
    }


def test_import_keeps_what_is_here_and_checks_what_it_draws(page: Any) -> None:
    send(page, "mine")
    mine_id = page.evaluate(
        "new Promise(r => indexedDB.open('sovereign-chat').onsuccess = e => e.target.result"
        ".transaction('conversations').objectStore('conversations')"
        ".getAllKeys().onsuccess = k => r(k.target.result[0]))"
    )
    older = {"id": mine_id, "title": "older copy", "messages": [{"role": "user", "content": "before"}]}
    odd = {
        "id": "odd",
        "title": "odd stats",
        "updated": 9e15,  # drawn first after a reload
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "stats": {"completion_tokens": "many", "tokens_per_second": "fast"}},
        ],
    }
    page.set_input_files("#import-file", files=[_export(older, odd)])
    page.wait_for_selector("#composer-error.info:has-text('Imported 2 conversations.')")
    assert sorted(page.locator(".conversation-title").all_inner_texts()) == ["mine", "odd stats", "older copy"]
    page.set_input_files("#import-file", files=[_export(odd)])
    page.wait_for_selector("#composer-error.info:has-text('Imported 0 conversations (1 already here, unchanged).')")
    page.reload()
    page.wait_for_selector(READY)  # the odd stats draw as nothing, not as an error that stops the page
    assert last_answer(page).locator(".message-content").inner_text() == "a"
    page.locator(".conversation-title", has_text="mine").click()
    assert last_answer(page).locator(".message-content").inner_text() == "You said: mine"


def test_a_stream_cut_off_before_its_end_says_so(page: Any) -> None:
    cut = 'data: {"choices":[{"index":0,"delta":{"content":"Half an"}}]}\n\n'
    page.route("**/v1/chat/completions", lambda route: route.fulfill(body=cut, content_type="text/event-stream"))
    send(page, "hello")
    answer = last_answer(page)
    assert answer.locator(".message-content").inner_text() == "Half an"
    assert "cut off" in answer.locator(".message-error").inner_text()


def test_server_sent_events_split_as_the_spec_says(page: Any) -> None:
    events = page.evaluate(
        r"""async () => {
            const { sseData } = await import('/ui/js/api.js');
            const pieces = ['data: a\r', '\ndata: b\r\n\r\n', 'data: c\r\rdata: {"x"\ndata: :1}\n\n',
                            ': hi\n\nevent: e\n', 'data: [DONE]\n\ndata: never ended'];
            const bytes = new TextEncoder();
            const body = new ReadableStream({
                start(c) { for (const p of pieces) c.enqueue(bytes.encode(p)); c.close(); },
            });
            const seen = [];
            for await (const data of sseData(body, new AbortController().signal)) seen.push(data);
            return seen;
        }"""
    )
    assert events == ["a\nb", "c", '{"x"\n:1}', "[DONE]"]


def test_a_streamed_answer_settles_only_outside_whole_fences(page: Any) -> None:
    cuts = page.evaluate(
        r"""async () => {
            const { settledEnd } = await import('/ui/js/messages.js');
            return [
                settledEnd('a\n\n````md\n```py\nx\n```\n\nstill in\n````\n\nout', 0),
                settledEnd('a\n\n~~~\nx\n```\n\ny', 0),
                settledEnd('a\n\n  ```\nx\n\ny', 0),
                settledEnd('use ```x``` here\n\nb', 0),
                settledEnd('```py\nx\n```python\n\ny', 0),
            ];
        }"""
    )
    assert cuts == [38, 3, 3, 18, 0]


def test_two_401s_at_once_share_one_key_prompt(browser: Any, recorder: Recorder, engine: FakeEngine) -> None:
    """The model list's refresh and a message both meet a changed key: one dialog answers both."""
    with InProcessServer(create_app(engine, ServerOptions(api_keys=("k-123",)))) as server:
        page = open_page(browser, recorder)
        page.clock.install()
        page.goto(server.url + "/")
        page.evaluate("localStorage.setItem('sovereign.apiKey', 'k-123')")
        page.reload()
        page.wait_for_selector(READY)
        page.evaluate("localStorage.setItem('sovereign.apiKey', 'wrong')")
        page.fill("#input", "hello")
        page.press("#input", "Enter")
        page.wait_for_selector("#key-dialog[open]")
        asked = len(recorder.urls)
        deadline = time.monotonic() + 15
        while not any(url.endswith("/v1/models") for url in recorder.urls[asked:]):
            assert time.monotonic() < deadline, recorder.urls
            page.clock.fast_forward(16_000)  # the model list's refresh comes round while the dialog is open
            page.wait_for_timeout(200)
        assert page.locator("#key-dialog[open]").count() == 1
        page.fill("#key-input", "k-123")
        page.click("#key-ok")
        page.wait_for_selector(ANSWERED)
        assert last_answer(page).locator(".message-content").inner_text() == "You said: hello"
        assert page.locator("#key-dialog[open]").count() == 0
        page.context.close()


def test_a_table_keeps_its_alignment_under_the_csp(page: Any) -> None:
    """markdown-it aligns columns with style attributes, which the CSP refuses: they become classes."""
    refused: list[str] = []
    page.on(
        "console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None
    )
    send(page, "x\n\n| a | b |\n|--:|:-:|\n| 1 | 2 |")
    cell = last_answer(page).locator("td").first
    assert cell.get_attribute("style") is None and cell.get_attribute("class") == "align-right"
    assert cell.evaluate("td => getComputedStyle(td).textAlign") == "right"
    assert refused == []


def test_an_attached_file_s_fence_outlasts_its_backticks(page: Any) -> None:
    text = page.evaluate(
        r"""async () => {
            const { messageText } = await import('/ui/js/attachments.js');
            return messageText({ content: "see", attachments: [{ name: "notes.md", text: "````\nx\n````" }] });
        }"""
    )
    assert text == "see\n\nnotes.md:\n`````md\n````\nx\n````\n`````"


def test_every_control_is_labelled_and_reachable_by_keyboard(page: Any) -> None:
    """Buttons, fields and the model picker have names a screen reader reads; Tab reaches Send from the box."""
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input:not([type=file]), select, textarea')]
            .filter((e) => e.offsetParent !== null)
            .filter((e) => !(e.getAttribute('aria-label') || (e.labels && e.labels.length) || e.textContent.trim()
                             || e.title))
            .map((e) => e.outerHTML)"""
    )
    assert unnamed == []
    page.focus("#input")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "attach"


def test_the_server_times_each_answer_as_llama_server_does(server: ServerProcess) -> None:
    """The usage chunk of a stream carries `timings` (llama-server's names), which the page shows."""
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=120) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    last = json.loads(frames[-1])
    usage, timings = last["usage"], last["timings"]
    assert timings["predicted_n"] == usage["completion_tokens"]
    assert timings["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert timings["prompt_n"] + timings["cache_n"] == usage["prompt_tokens"]
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] >= 0
    if usage["completion_tokens"] > 1:
        assert timings["predicted_per_second"] > 0


def test_the_page_shows_the_servers_timings(browser: Any, recorder: Recorder, server: ServerProcess) -> None:
    page = open_chat(browser, recorder, server.url)
    page.select_option("#model", GEMMA)
    page.click("#toggle-settings")
    page.fill("#max_tokens", "6")
    send(page, "Say hello.")
    stats = last_answer(page).locator(".stats")
    assert stats.get_attribute("title") == "Times measured by the server"
    assert "first token" in stats.inner_text() and "prompt tokens" in stats.inner_text()
    page.context.close()
