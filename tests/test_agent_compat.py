"""What agent clients need beyond the API reference: a root that answers, Anthropic's model list, model-name
routing, context editing, pings during a long prefill, and Anthropic's wording for a prompt that is too long."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from sovereign.errors import BadRoute, ContextLengthExceeded, ModelNotFound
from sovereign.model_routes import ModelRoutes, parse_route
from sovereign.server.app import ServerOptions, create_app
from sovereign.server.errors import from_exception
from sovereign.server.running import with_heartbeat
from tests.conftest import GEMMA
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer
from tests.test_engine import make_pool


@pytest.fixture(scope="module")
def fake_server() -> Iterator[InProcessServer]:
    with InProcessServer(create_app(FakeEngine(), ServerOptions(preload=("fake:model",)))) as running:
        yield running


def test_the_root_answers_get_and_head(fake_server: InProcessServer) -> None:
    assert httpx.head(fake_server.url + "/").status_code == 200  # Claude Code's first request
    assert httpx.get(fake_server.url + "/").json()["name"] == "sovereign"


def test_models_in_anthropic_shape_for_anthropic_clients(fake_server: InProcessServer) -> None:
    client = anthropic.Anthropic(base_url=fake_server.url, api_key="unused", max_retries=0)
    listed = client.models.list()
    assert [m.id for m in listed.data] and listed.data[0].type == "model"
    one = client.models.retrieve("fake:model")
    assert one.id == "fake:model" and one.display_name == "fake:model"
    assert httpx.get(fake_server.url + "/v1/models").json()["object"] == "list"  # OpenAI's shape otherwise


def _tool_history(uses: int) -> list[dict[str, object]]:
    """A conversation of `uses` tool round trips, each result long."""
    messages: list[dict[str, object]] = [{"role": "user", "content": "read the files"}]
    for n in range(uses):
        messages.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": f"toolu_{n}", "name": "read", "input": {"path": f"{n}.txt"}}],
            }
        )
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": "word " * 50}]}
        )
    messages.append({"role": "user", "content": "summarise"})
    return messages


def test_context_editing_clears_old_tool_results(fake_server: InProcessServer) -> None:
    edits = {
        "edits": [
            {
                "type": "clear_tool_uses_20250919",
                "trigger": {"type": "input_tokens", "value": 100},
                "keep": {"type": "tool_uses", "value": 1},
            }
        ]
    }
    body = {
        "model": "fake:model",
        "max_tokens": 8,
        "messages": _tool_history(4),
        "tools": [{"name": "read", "input_schema": {"type": "object"}}],
    }
    counted = httpx.post(
        fake_server.url + "/v1/messages/count_tokens",
        json={**{k: v for k, v in body.items() if k != "max_tokens"}, "context_management": edits},
    ).json()
    assert counted["context_management"]["original_input_tokens"] > counted["input_tokens"], counted
    answer = httpx.post(fake_server.url + "/v1/messages", json={**body, "context_management": edits}).json()
    (applied,) = answer["context_management"]["applied_edits"]
    assert (
        applied["type"] == "clear_tool_uses_20250919"
        and applied["cleared_tool_uses"] == 3
        and applied["cleared_input_tokens"] > 0
    )
    untouched = httpx.post(
        fake_server.url + "/v1/messages",
        json={**body, "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
    ).json()
    assert untouched["context_management"] == {"applied_edits": []}  # below the default trigger: nothing cleared
    streamed = httpx.post(
        fake_server.url + "/v1/messages", json={**body, "stream": True, "context_management": edits}
    ).text
    deltas = [
        json.loads(line[6:])
        for line in streamed.splitlines()
        if line.startswith("data: ") and '"message_delta"' in line
    ]
    assert deltas[-1]["context_management"]["applied_edits"][0]["cleared_tool_uses"] == 3
    bad = httpx.post(
        fake_server.url + "/v1/messages",
        json={**body, "context_management": {"edits": [{"type": "forget_everything"}]}},
    )
    assert bad.status_code == 400 and bad.json()["type"] == "error", bad.text


def test_pings_while_nothing_comes() -> None:
    async def slow() -> AsyncIterator[str]:
        await asyncio.sleep(0.25)
        yield "first"
        yield "second"

    async def main() -> list[str | None]:
        return [event async for event in with_heartbeat(slow(), 0.1)]

    seen = asyncio.run(main())
    assert seen[-2:] == ["first", "second"] and seen.count(None) >= 1, seen


def test_a_prompt_too_long_in_anthropic_words() -> None:
    error = from_exception(ContextLengthExceeded(21_000, 8_192))
    assert error.anthropic_body()["error"]["message"] == "prompt is too long: 21000 tokens > 8192 maximum"
    assert "maximum context length is 8192 tokens" in error.body()["error"]["message"]  # OpenAI's wording stays


def test_model_routes_parse_and_match() -> None:
    routes = ModelRoutes(
        (parse_route("claude-*-haiku*=small:1b"), parse_route("claude-*=big:8b")), fallback="default:1b"
    )
    assert routes.mapped("claude-3-5-haiku-latest") == "small:1b" and routes.mapped("claude-opus-4-8") == "big:8b"
    assert routes.mapped("qwen3:8b") is None
    assert ModelRoutes(fallback="default:1b").fallback_for("gpt-4.1") == "default:1b"
    assert ModelRoutes(fallback="default:1b").fallback_for("qwen3:8b") is None
    for bad in ("claude-*", "=x", "claude-*="):
        with pytest.raises(BadRoute):
            parse_route(bad)


def test_the_pool_answers_closed_names_with_the_default_or_an_alias(real_model_home: Path) -> None:
    from dataclasses import replace

    pool = make_pool(real_model_home)
    with pytest.raises(ModelNotFound) as missing:
        pool.resolve("claude-opus-4-8")
    assert "--alias" in (missing.value.hint or "") and "sovereign pull claude" not in (missing.value.hint or "")
    pool.options = replace(pool.options, routes=ModelRoutes(fallback=GEMMA))
    assert pool.resolve("claude-opus-4-8").name == GEMMA
    with pytest.raises(ModelNotFound):
        pool.resolve("llama3:70b")  # not a closed-API name: no silent substitution
    pool.options = replace(pool.options, routes=ModelRoutes((("claude-*", "missing:1b"),), fallback=GEMMA))
    with pytest.raises(ModelNotFound) as unmapped:
        pool.resolve("claude-opus-4-8")
    assert "missing:1b" in str(unmapped.value)


def test_the_default_context_has_room_for_an_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovereign.engine.runtime import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 16 * 2**30)
    assert resources.default_context(32_768, 8_192, 20_000) == 32_768  # the catalog's 8k is raised for agents
    assert resources.default_context(8_192, 8_192, 20_000) == 8_192  # never past what the model was trained for
    assert resources.default_context(131_072, None, 20_000) == 131_072
    monkeypatch.setattr(resources, "available_memory", lambda: 2**30)
    assert resources.default_context(32_768, 8_192, 100_000) < 32_768  # memory caps it


def test_claude_codes_per_session_billing_line_is_not_part_of_the_prompt() -> None:
    """Two sessions differ only in that line; dropped, their prompts share every token up to the first message."""
    from sovereign.server.anthropic_convert import chat_request_from
    from sovereign.server.anthropic_schemas import MessagesBody

    def request(billing: str) -> list[dict[str, object]]:
        body = MessagesBody.model_validate(
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 16,
                "system": [
                    {
                        "type": "text",
                        "text": f"x-anthropic-billing-header: cc_version=2.1.332.{billing}; cc_entrypoint=sdk-cli;",
                    },
                    {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "Be brief."},
                ],
                "messages": [{"role": "user", "content": "hi"}],
            }
        )
        return chat_request_from(body).messages

    first, second = request("1c9"), request("93d")
    assert first == second
    assert first[0] == {"role": "system", "content": "You are a Claude agent.\nBe brief."}
