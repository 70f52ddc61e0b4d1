"""/v1/responses as OpenAI's Codex CLI calls it, against the fake engine.

Codex CLI 0.171, with a custom provider and wire_api = "responses".

The body below has the shape codex-rs serializes (ResponsesApiRequest in codex-rs/codex-api/src/common.rs, tools from
codex-rs/tools/src/tool_spec.rs): client_metadata, a `namespace` tool grouping the multi-agent functions, a built-in
web_search with external_web_access false, store false, include, prompt_cache_key, text.verbosity, reasoning.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from sovereign.engine import ChatRequest
from sovereign.server.app import ServerOptions, create_app
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer

OBJECT = {
    "type": "object",
    "properties": {"message": {"type": "string"}},
    "required": ["message"],
    "additionalProperties": False,
}
MULTI_AGENT = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools to run sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "spawn_agent",
            "description": "Start a sub-agent.",
            "strict": False,
            "parameters": OBJECT,
        },
        {
            "type": "function",
            "name": "wait_agent",
            "description": "Wait for a sub-agent.",
            "strict": False,
            "defer_loading": True,
            "parameters": OBJECT,
        },
    ],
}
SHELL = {
    "type": "function",
    "name": "shell_command",
    "description": "Runs a shell command.",
    "strict": False,
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}


def codex_body(text: str = "hello there", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "fake:model",
        "instructions": "You are Codex, a coding agent.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [
                    {"type": "input_text", "text": "<permissions instructions>sandboxed</permissions instructions>"}
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "<environment_context><cwd>/tmp</cwd></environment_context>"}
                ],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        ],
        "tools": [copy.deepcopy(MULTI_AGENT), copy.deepcopy(SHELL), copy.deepcopy(WEB_SEARCH)],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "xhigh", "summary": "auto"},
        "store": False,
        "stream": False,
        "stream_options": {"include_obfuscation": False},
        "include": ["reasoning.encrypted_content"],
        "service_tier": "priority",
        "prompt_cache_key": "019a0000-0000-7000-8000-000000000000",
        "text": {"verbosity": "low"},
        "client_metadata": {"x-codex-installation-id": "abc", "x-codex-turn-metadata": '{"turn_id":"1"}'},
    }
    return {**body, **overrides}


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def server(fake: FakeEngine) -> Iterator[InProcessServer]:
    with InProcessServer(create_app(fake, ServerOptions(preload=("fake:model",)))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def post(server: InProcessServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json=body, timeout=10)


def events(server: InProcessServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True}, timeout=10) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def last_request(fake: FakeEngine) -> ChatRequest:
    request = fake.requests[-1]
    assert isinstance(request, ChatRequest)
    return request


def test_codex_request_is_accepted(server: InProcessServer, fake: FakeEngine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="sovereign.server.responses_convert"):
        response = post(server, codex_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed" and body["output"][-1]["content"][0]["text"] == "You said: hello there"
    assert body["sovereign_dropped_tools"] == ["web_search"]
    assert "web_search" in caplog.text
    # The namespace's functions are offered as ordinary function tools, named <namespace>__<name>.
    request = last_request(fake)
    offered = {tool["function"]["name"]: tool["function"] for tool in request.tools}
    assert list(offered) == ["multi_agent_v1__spawn_agent", "multi_agent_v1__wait_agent", "shell_command"]
    assert offered["multi_agent_v1__spawn_agent"]["description"] == "Tools to run sub-agents.\n\nStart a sub-agent."
    assert offered["multi_agent_v1__spawn_agent"]["parameters"] == OBJECT
    assert request.tool_choice.mode == "auto" and request.parallel_tool_calls is False
    assert request.reasoning.effort == "high"  # xhigh, as far as a template goes
    assert request.messages[0] == {"role": "system", "content": "You are Codex, a coding agent."}
    # The echoed tools are those offered: web_search is gone, the namespace stays as sent.
    assert [tool["type"] for tool in body["tools"]] == ["namespace", "function"]
    # The streamed form too: the dropped tool is named in the response objects of created and completed.
    frames = events(server, codex_body())
    assert frames[0]["type"] == "response.created" and frames[0]["response"]["sovereign_dropped_tools"] == [
        "web_search"
    ]
    assert frames[-1]["type"] == "response.completed" and frames[-1]["response"]["sovereign_dropped_tools"] == [
        "web_search"
    ]


def test_a_plain_request_has_no_dropped_tools_field(server: InProcessServer) -> None:
    body = post(server, {"model": "fake:model", "input": "hello there", "tools": [SHELL]}).json()
    assert "sovereign_dropped_tools" not in body


def test_namespaced_call_goes_back_split_in_name_and_namespace(
    server: InProcessServer, client: OpenAI, fake: FakeEngine
) -> None:
    # The fake calls the first tool offered when the last message starts with "call": here multi_agent_v1's spawn_agent.
    body = post(server, codex_body("call a helper")).json()
    (call,) = [item for item in body["output"] if item["type"] == "function_call"]
    assert call["name"] == "spawn_agent" and call["namespace"] == "multi_agent_v1"
    assert json.loads(call["arguments"]) == {"echo": "call a helper"}
    frames = events(server, codex_body("call a helper"))
    added = [
        f["item"] for f in frames if f["type"] == "response.output_item.added" and f["item"]["type"] == "function_call"
    ]
    done = [
        f["item"] for f in frames if f["type"] == "response.output_item.done" and f["item"]["type"] == "function_call"
    ]
    assert [(i["name"], i["namespace"]) for i in added + done] == [("spawn_agent", "multi_agent_v1")] * 2
    assert [(i["name"], i["namespace"]) for i in frames[-1]["response"]["output"]] == [
        ("spawn_agent", "multi_agent_v1")
    ]
    # The official client reads the field (newer SDK types carry function_call.namespace).
    sdk_body = {
        k: v
        for k, v in codex_body("call a helper").items()
        if k not in ("stream", "client_metadata", "access_programs")
    }
    parsed = client.responses.create(**sdk_body, extra_body={"client_metadata": {"x-codex-installation-id": "abc"}})
    (item,) = parsed.output
    assert item.type == "function_call" and item.name == "spawn_agent" and item.namespace == "multi_agent_v1"
    # Codex hands the call back in the next turn's input, namespace and all: the model sees the name it was offered.
    follow = codex_body("thanks")
    follow["input"] = follow["input"][:-1] + [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "call a helper"}]},
        {
            "type": "function_call",
            "call_id": call["call_id"],
            "name": "spawn_agent",
            "namespace": "multi_agent_v1",
            "arguments": call["arguments"],
        },
        {"type": "function_call_output", "call_id": call["call_id"], "output": "agent started"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks"}]},
    ]
    assert post(server, follow).status_code == 200
    (assistant,) = [m for m in last_request(fake).messages if m.get("tool_calls")]
    assert assistant["tool_calls"][0]["function"]["name"] == "multi_agent_v1__spawn_agent"


def test_a_forced_namespaced_function(server: InProcessServer, fake: FakeEngine) -> None:
    for choice in (
        {"type": "function", "name": "wait_agent"},
        {"type": "function", "name": "multi_agent_v1__wait_agent"},
    ):
        body = post(server, codex_body(tool_choice=choice)).json()
        (call,) = [item for item in body["output"] if item["type"] == "function_call"]
        assert (call["name"], call["namespace"]) == ("wait_agent", "multi_agent_v1")
        assert last_request(fake).tool_choice.function == "multi_agent_v1__wait_agent"
    plain = post(server, codex_body(tool_choice={"type": "function", "name": "shell_command"})).json()
    (call,) = [item for item in plain["output"] if item["type"] == "function_call"]
    assert call["name"] == "shell_command" and "namespace" not in call


def test_other_builtin_tools_are_dropped_and_listed(server: InProcessServer, fake: FakeEngine) -> None:
    tools = [
        SHELL,
        {"type": "image_generation", "output_format": "png"},
        {"type": "tool_search", "execution": "client", "description": "Find tools.", "parameters": {"type": "object"}},
        {
            "type": "custom",
            "name": "apply_patch",
            "description": "Patch files.",
            "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
        },
        {
            "type": "namespace",
            "name": "mcp__docs__",
            "description": "Docs server.",
            "tools": [
                {"type": "function", "name": "search", "parameters": OBJECT},
                {"type": "custom", "name": "raw", "description": "x", "format": {"type": "text"}},
            ],
        },
    ]
    response = post(server, {"model": "fake:model", "input": "hello there", "tools": tools})
    assert response.status_code == 200, response.text
    assert response.json()["sovereign_dropped_tools"] == [
        "image_generation",
        "tool_search",
        "custom:apply_patch",
        "custom:mcp__docs__.raw",
    ]
    assert [t["function"]["name"] for t in last_request(fake).tools] == ["shell_command", "mcp__docs__search"]


def test_what_would_change_the_answer_is_refused(server: InProcessServer) -> None:
    forced = post(server, codex_body(tool_choice={"type": "web_search_preview"}))
    assert forced.status_code == 400 and "web_search_preview" in forced.json()["error"]["message"]
    only_builtin = post(
        server, {"model": "fake:model", "input": "hi", "tools": [WEB_SEARCH], "tool_choice": "required"}
    )
    assert only_builtin.status_code == 400 and "web_search" in only_builtin.json()["error"]["message"]
    # tool_choice auto with nothing left to call is fine: the model just answers.
    assert post(server, {"model": "fake:model", "input": "hi", "tools": [WEB_SEARCH]}).status_code == 200
    # Strictness otherwise stays: a parameter nobody defined is still an error.
    unknown = post(server, codex_body(frequency_penalty=1))
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_parameter"
    twice = post(
        server,
        {
            "model": "fake:model",
            "input": "hi",
            "tools": [
                {"type": "function", "name": "a__b", "parameters": OBJECT},
                {"type": "namespace", "name": "a", "description": "", "tools": [{"type": "function", "name": "b"}]},
            ],
        },
    )
    assert twice.status_code == 400 and "defined twice" in twice.json()["error"]["message"]


def test_max_output_tokens_cut_marks_the_message_incomplete(server: InProcessServer, client: OpenAI) -> None:
    body = post(server, codex_body(max_output_tokens=2)).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = body["output"]
    assert message["status"] == "incomplete" and message["content"][0]["text"] == "You said:"
    whole = post(server, codex_body()).json()
    assert whole["status"] == "completed" and whole["output"][0]["status"] == "completed"
    frames = events(server, codex_body(max_output_tokens=2))
    (done,) = [f["item"] for f in frames if f["type"] == "response.output_item.done"]
    assert done["status"] == "incomplete" and done["content"][0]["text"] == "You said:"
    assert frames[-1]["type"] == "response.incomplete" and frames[-1]["response"]["output"] == [done]
    parsed = client.responses.create(model="fake:model", input="hello there", max_output_tokens=2)
    assert (
        parsed.status == "incomplete" and parsed.output[0].status == "incomplete" and parsed.output_text == "You said:"
    )
