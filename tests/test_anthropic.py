"""/v1/messages and /v1/messages/count_tokens against the real server and model.

Both go through the official anthropic client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.conftest import GEMMA
from tests.servers import ServerProcess

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
TIME = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
}
HELLO = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> anthropic.Anthropic:
    # The Anthropic SDK adds /v1/messages itself: its base_url is the server's root.
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def sse_events(server: ServerProcess, body: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    """(event line, data) pairs of a raw streamed response."""
    events = []
    with httpx.stream("POST", f"{server.url}/v1/messages", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name  # every frame says its type twice: the SDK reads the event line
                events.append((name, data))
    return events


def test_create_returns_a_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=GEMMA, max_tokens=12, messages=HELLO, system="You are terse.", extra_body={"temperature": 0}
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == GEMMA
    (block,) = message.content
    assert block.type == "text" and isinstance(block.text, str)
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 5 and 0 < message.usage.output_tokens <= 12
    again = client.messages.create(
        model=GEMMA, max_tokens=12, messages=HELLO, system="You are terse.", extra_body={"temperature": 0}
    )
    assert again.content[0].text == block.text  # greedy: the same answer


def test_max_tokens_and_stop_sequences(client: anthropic.Anthropic) -> None:
    long = client.messages.create(model=GEMMA, max_tokens=24, messages=HELLO, extra_body={"temperature": 0})
    text = long.content[0].text
    if long.stop_reason == "max_tokens":
        assert long.usage.output_tokens == 24
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.messages.create(
        model=GEMMA, max_tokens=24, messages=HELLO, stop_sequences=[stop], extra_body={"temperature": 0}
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_stream_reassembles_with_the_sdk(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model=GEMMA, max_tokens=16, messages=HELLO, extra_body={"temperature": 0})
    with client.messages.stream(model=GEMMA, max_tokens=16, messages=HELLO, extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens


def test_streamed_event_order_is_anthropics(server: ServerProcess) -> None:
    events = sse_events(server, {"model": GEMMA, "max_tokens": 8, "messages": HELLO, "temperature": 0})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert all(data["delta"]["type"] == "text_delta" for name, data in events if name == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0


def test_forced_tool_use_any_and_named(client: anthropic.Anthropic) -> None:
    # Greedy: a random draw can spin out a long string argument and hit max_tokens before the call closes.
    message = client.messages.create(
        model=GEMMA,
        max_tokens=80,
        messages=HELLO,
        tools=[WEATHER, TIME],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use"
    (call,) = [block for block in message.content if block.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name in ("get_weather", "get_time")
    assert set(call.input) == ({"city", "unit"} if call.name == "get_weather" else {"zone"})
    named = client.messages.create(
        model=GEMMA,
        max_tokens=80,
        messages=HELLO,
        tools=[WEATHER, TIME],
        tool_choice={"type": "tool", "name": "get_time"},
        extra_body={"temperature": 0},
    )
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_time"]
    none = client.messages.create(
        model=GEMMA, max_tokens=8, messages=HELLO, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert none.stop_reason != "tool_use" and all(b.type == "text" for b in none.content)


def test_streamed_tool_use_reassembles_and_a_tool_result_continues(
    client: anthropic.Anthropic, server: ServerProcess
) -> None:
    with client.messages.stream(
        model=GEMMA,
        max_tokens=80,
        messages=HELLO,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    (call,) = final.content
    assert call.type == "tool_use" and call.name == "get_weather" and set(call.input) == {"city", "unit"}
    assert final.stop_reason == "tool_use"
    events = sse_events(
        server,
        {"model": GEMMA, "max_tokens": 80, "messages": HELLO, "tools": [WEATHER], "tool_choice": {"type": "any"}},
    )
    kinds = [
        (name, data.get("delta", {}).get("type") or data.get("content_block", {}).get("type")) for name, data in events
    ]
    assert ("content_block_start", "tool_use") in kinds and ("content_block_delta", "input_json_delta") in kinds
    # The conversation goes on with the tool's answer, as the SDK's tool loop sends it.
    follow = client.messages.create(
        model=GEMMA,
        max_tokens=12,
        tools=[WEATHER],
        extra_body={"temperature": 0},
        messages=[
            *HELLO,
            {"role": "assistant", "content": final.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12 C, rain"}]},
        ],
    )
    assert follow.content and follow.usage.input_tokens > 20


def test_count_tokens_matches_what_create_reads(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=GEMMA, messages=HELLO, system="You are terse.")
    created = client.messages.create(model=GEMMA, max_tokens=1, messages=HELLO, system="You are terse.")
    assert counted.input_tokens == created.usage.input_tokens > 5
    with_tools = client.messages.count_tokens(model=GEMMA, messages=HELLO, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens  # the tool definitions are part of the prompt


def test_errors_use_anthropics_envelope(client: anthropic.Anthropic, server: ServerProcess) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope:1b", max_tokens=4, messages=HELLO)
    assert missing.value.status_code == 404 and missing.value.body["error"]["type"] == "not_found_error"
    assert missing.value.body["type"] == "error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as no_images:
        client.messages.create(
            model=GEMMA,
            max_tokens=4,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
        )
    assert (
        no_images.value.body["error"]["type"] == "invalid_request_error"
        and "image" in no_images.value.body["error"]["message"]
    )
    cases = [
        {"model": GEMMA, "messages": HELLO},  # max_tokens is required
        {"model": GEMMA, "max_tokens": 4, "messages": []},
        {"model": GEMMA, "max_tokens": 4, "messages": HELLO, "frequency_penalty": 1},  # not an Anthropic parameter
        {"model": GEMMA, "max_tokens": 4, "messages": HELLO, "tool_choice": {"type": "any"}},  # no tools to choose
        {
            "model": GEMMA,
            "max_tokens": 4,
            "messages": HELLO,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
    ]
    for body in cases:
        response = httpx.post(f"{server.url}/v1/messages", json=body, timeout=60)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.InternalServerError) as broken:  # the session's store holds a model that cannot load
        client.messages.create(model="broken:model", max_tokens=2, messages=HELLO)
    assert broken.value.status_code == 500 and broken.value.body["error"]["type"] == "api_error"
    assert client.messages.create(model=GEMMA, max_tokens=2, messages=HELLO).content  # the server keeps serving


@pytest.fixture(scope="module")
def keyed(real_model_home: Path) -> Iterator[ServerProcess]:
    with ServerProcess(
        real_model_home, GEMMA, "--api-key", "sk-test", "--parallel", "1", "--max-queue", "0"
    ) as running:
        yield running


def test_api_keys_and_overload(keyed: ServerProcess) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0).messages.create(
            model=GEMMA, max_tokens=2, messages=HELLO
        )
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert (
        httpx.post(
            f"{keyed.url}/v1/messages", json={"model": GEMMA, "max_tokens": 2, "messages": HELLO}, timeout=60
        ).status_code
        == 401
    )
    # The SDK sends its key as a bearer token; curl users send x-api-key, as Anthropic documents: both work.
    good = anthropic.Anthropic(base_url=keyed.url, api_key="sk-test", max_retries=0)
    assert good.messages.create(model=GEMMA, max_tokens=2, messages=HELLO).content
    raw = httpx.post(
        f"{keyed.url}/v1/messages",
        headers={"x-api-key": "sk-test"},
        json={"model": GEMMA, "max_tokens": 2, "messages": HELLO},
        timeout=60,
    )
    assert raw.status_code == 200
    # One slot, no queue: a second request while the first streams is overloaded (Anthropic's 529).
    body = {"model": GEMMA, "max_tokens": 2000, "messages": HELLO, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{keyed.url}/v1/messages", headers={"x-api-key": "sk-test"}, json=body, timeout=60
    ) as running:
        lines = running.iter_lines()
        next(lines)
        with pytest.raises(anthropic.OverloadedError) as busy:
            good.messages.create(model=GEMMA, max_tokens=2, messages=HELLO)
    assert busy.value.status_code == 529 and busy.value.body["error"]["type"] == "overloaded_error"
