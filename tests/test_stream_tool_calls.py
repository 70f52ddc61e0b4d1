"""Calls streamed as deltas are sent once: the closing ToolCallsEvent, which lists every call, adds only the others.

A scripted engine answers with text, two calls streamed piece by piece, then a ToolCallsEvent that lists both and a
third call read whole; each API's stream must carry exactly three calls, in that order, each opened and closed once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import pytest

from sovereign.engine import (
    ChatRequest,
    CompletionRequest,
    Finished,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallsEvent,
    Usage,
)
from sovereign.engine.requests import Event
from sovereign.server.app import ServerOptions, create_app
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer

FIRST, SECOND, WHOLE = '{"echo": "a"}', '{"echo": "bc"}', '{"echo": "d"}'
CALLS = [ToolCall("call_one", "f", FIRST), ToolCall("call_two", "f", SECOND), ToolCall("call_three", "f", WHOLE)]
SCHEMA = {"type": "object", "properties": {"echo": {"type": "string"}}}
USER = [{"role": "user", "content": "go"}]


class ScriptedEngine(FakeEngine):
    """The fake engine, answering every chat request with the same mix of streamed and whole calls."""

    async def _events(self, request: ChatRequest | CompletionRequest, stopped: Any) -> AsyncGenerator[Event, None]:
        yield TextDelta("Two calls:")
        for index, call in enumerate(CALLS[:2]):
            yield ToolCallDelta(index, call.id, call.name)
            for start in range(0, len(call.arguments), 7):
                yield ToolCallDelta(index, arguments=call.arguments[start : start + 7])
        yield ToolCallsEvent(CALLS)
        yield Finished("tool_calls", Usage(5, 9))


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    with InProcessServer(create_app(ScriptedEngine(), ServerOptions())) as running:
        yield running


def payloads(server: InProcessServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON payload of each frame of a streamed response ([DONE] left out)."""
    body = {**body, "model": "fake:model", "stream": True}
    with httpx.stream("POST", server.url + path, json=body, timeout=10) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_chat_sends_each_call_once(server: InProcessServer) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    chunks = payloads(server, "/v1/chat/completions", {"messages": USER, "tools": [tool]})
    calls = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert [(call["index"], call.get("id"), call["function"]) for call in calls] == [
        (0, "call_one", {"name": "f", "arguments": ""}),
        (0, None, {"arguments": '{"echo"'}),
        (0, None, {"arguments": ': "a"}'}),
        (1, "call_two", {"name": "f", "arguments": ""}),
        (1, None, {"arguments": '{"echo"'}),
        (1, None, {"arguments": ': "bc"}'}),
        (2, "call_three", {"name": "f", "arguments": ""}),
        (2, None, {"arguments": WHOLE}),
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_sends_each_call_once(server: InProcessServer) -> None:
    tool = {"name": "f", "input_schema": SCHEMA}
    events = payloads(server, "/v1/messages", {"max_tokens": 50, "messages": USER, "tools": [tool]})

    def brief(event: dict[str, Any]) -> tuple[Any, ...]:
        block, delta = event.get("content_block", {}), event.get("delta", {})
        shown = block.get("id") or block.get("type")
        shown = shown or delta.get("partial_json") or delta.get("text") or delta.get("stop_reason")
        return event["type"], event.get("index"), shown

    assert [brief(event) for event in events] == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"),
        ("ping", None, None),
        ("content_block_delta", 0, "Two calls:"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "toolu_one"),
        ("content_block_delta", 1, '{"echo"'),
        ("content_block_delta", 1, ': "a"}'),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "toolu_two"),
        ("content_block_delta", 2, '{"echo"'),
        ("content_block_delta", 2, ': "bc"}'),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, "toolu_three"),
        ("content_block_delta", 3, WHOLE),
        ("content_block_stop", 3, None),
        ("message_delta", None, "tool_use"),
        ("message_stop", None, None),
    ]


def test_responses_sends_each_call_once(server: InProcessServer) -> None:
    tool = {"type": "function", "name": "f", "parameters": SCHEMA}
    events = payloads(server, "/v1/responses", {"input": "go", "tools": [tool]})

    def brief(event: dict[str, Any]) -> tuple[Any, ...]:
        item = event.get("item", {})
        shown = item.get("call_id") or item.get("type") or event.get("delta") or event.get("arguments")
        return event["type"].removeprefix("response."), event.get("output_index"), shown

    assert [brief(event) for event in events] == [
        ("created", None, None),
        ("in_progress", None, None),
        ("output_item.added", 0, "message"),
        ("content_part.added", 0, None),
        ("output_text.delta", 0, "Two calls:"),
        ("output_text.done", 0, None),
        ("content_part.done", 0, None),
        ("output_item.done", 0, "message"),
        ("output_item.added", 1, "call_one"),
        ("function_call_arguments.delta", 1, '{"echo"'),
        ("function_call_arguments.delta", 1, ': "a"}'),
        ("function_call_arguments.done", 1, FIRST),
        ("output_item.done", 1, "call_one"),
        ("output_item.added", 2, "call_two"),
        ("function_call_arguments.delta", 2, '{"echo"'),
        ("function_call_arguments.delta", 2, ': "bc"}'),
        ("function_call_arguments.done", 2, SECOND),
        ("output_item.done", 2, "call_two"),
        ("output_item.added", 3, "call_three"),
        ("function_call_arguments.delta", 3, WHOLE),
        ("function_call_arguments.done", 3, WHOLE),
        ("output_item.done", 3, "call_three"),
        ("completed", None, None),
    ]
    assert [item["call_id"] for item in events[-1]["response"]["output"][1:]] == ["call_one", "call_two", "call_three"]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
