"""Recorded answers of real model families, streamed token by token through the engine's own reading path.

The server streams every answer through Engine._events: stop strings cut, then the family's
reader turns text into content, reasoning and tool calls. These tests feed that path the way the
model's process does (one Step per token), with outputs in each family's own syntax.
"""

from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace
from typing import Any

import pytest

from sovereign.engine import Engine, Finished, ReasoningDelta, SamplingParams, TextDelta, ToolCallDelta, ToolCallsEvent
from sovereign.engine.engine import _Prepared
from sovereign.engine.formats import FORMATS
from sovereign.engine.stats import RequestStats
from sovereign.engine.stream import TokenStream
from sovereign.engine.wire import Step

WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def read(
    family: str,
    output: str,
    *,
    tools: list[dict[str, Any]] | None = None,
    mode: str = "auto",
    in_reasoning: bool = False,
    seed: int = 0,
    raw: bool = False,
    stop: tuple[str, ...] = (),
    parallel: bool = True,
    budget: int | None = None,
    forced: list[str] | None = None,
) -> dict[str, Any]:
    """Stream `output` in random 1-4 character tokens through the engine and gather what comes out."""

    async def run() -> list[Any]:
        engine = Engine(None, reasoning_format="none" if raw else "auto")  # type: ignore[arg-type]
        model = SimpleNamespace(format=FORMATS[family])
        prepared = _Prepared(
            model, [1, 2, 3], SamplingParams(stop=stop), mode, tools or [], in_reasoning, parallel, budget
        )  # type: ignore[arg-type]
        stream = TokenStream(RequestStats("m", 3), on_force=(forced if forced is not None else []).append)
        rng, at = random.Random(seed), 0
        while at < len(output):
            size = rng.randint(1, 4)
            stream.push(Step(7, output[at : at + size].encode(), None, False))
            at += size
        stream.push(Step(1, b"", None, True))
        stream.end()
        return [event async for event in engine._events(prepared, stream)]

    events = asyncio.run(run())
    calls = [call for event in events if isinstance(event, ToolCallsEvent) for call in event.calls]
    finished = events[-1]
    assert isinstance(finished, Finished)
    streamed: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            if event.id is not None:
                streamed[event.index] = [event.name or "", ""]
            else:
                streamed[event.index][1] += event.arguments
    return {
        "streamed": [(name, json.loads(arguments)) for name, arguments in streamed.values()],
        "content": "".join(e.text for e in events if isinstance(e, TextDelta)),
        "reasoning": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "calls": [(c.name, json.loads(c.arguments)) for c in calls],
        "reason": finished.reason,
        "order": [type(e).__name__ for e in events],
    }


@pytest.mark.parametrize("seed", range(3))
def test_qwen3_reasoning_then_answer(seed: int) -> None:
    got = read("hermes", "<think>\nThe user greets me.\n</think>\n\nHello there!", seed=seed)
    assert got["reasoning"] == "The user greets me." and got["content"] == "Hello there!" and got["reason"] == "stop"
    last_reasoning = max(i for i, kind in enumerate(got["order"]) if kind == "ReasoningDelta")
    assert got["order"].index("TextDelta") > last_reasoning


def test_deepseek_r1_prompt_opens_the_reasoning() -> None:
    got = read("deepseek_r1", "Let me think.\n</think>\n\nIt is 4.", in_reasoning=True)
    assert got["reasoning"] == "Let me think." and got["content"] == "It is 4."


@pytest.mark.parametrize("seed", range(3))
def test_hermes_tool_calls_after_text_and_reasoning(seed: int) -> None:
    output = (
        "<think>I need the weather.</think>\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    )
    got = read("hermes", output, tools=WEATHER, seed=seed)
    assert got["reasoning"] == "I need the weather." and got["content"] == "Let me check."
    assert got["calls"] == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lima"})]
    assert got["streamed"] == got["calls"], "the arguments streamed piece by piece add up to the calls"
    assert got["reason"] == "tool_calls" and "<tool_call>" not in got["content"]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    output = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>'
    )
    one = read("hermes", output, tools=WEATHER, parallel=False)
    assert one["calls"] == [("get_weather", {"city": "A"})] and one["streamed"] == one["calls"]
    assert len(read("hermes", output, tools=WEATHER)["calls"]) == 2


def test_llama3_python_tag_and_mistral_tool_calls() -> None:
    llama = read(
        "llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eom_id|>', tools=WEATHER
    )
    assert llama["calls"] == [("get_weather", {"city": "Oslo"})] and llama["content"] == ""
    mistral = read("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}', tools=WEATHER)
    assert mistral["calls"] == [("get_weather", {"city": "Rome"})]


def test_gpt_oss_channels() -> None:
    output = (
        "<|channel|>analysis<|message|>They want Tokyo's weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather "
        '<|constrain|>json<|message|>{"city": "Tokyo"}<|call|>'
    )
    got = read("gpt_oss", output, tools=WEATHER)
    assert got["reasoning"] == "They want Tokyo's weather." and got["calls"] == [("get_weather", {"city": "Tokyo"})]


def test_a_call_to_a_tool_not_offered_is_dropped() -> None:
    got = read("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', tools=WEATHER)
    assert got["calls"] == [] and got["streamed"] == [] and got["reason"] == "stop"


def test_forced_calls_read_in_the_family_syntax_generic_and_raw_keep_the_plain_path() -> None:
    # A forced call's grammar writes the family's own syntax (call_grammar), so the family's parser reads it.
    forced = read(
        "hermes",
        '<think>ok</think><tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>',
        tools=WEATHER,
        mode="forced",
    )
    assert (
        forced["calls"] == [("get_weather", {"city": "Bern"})]
        and forced["reasoning"] == "ok"
        and forced["content"] == ""
    )
    bare = read("generic", '{"name": "get_weather", "arguments": {"city": "Bern"}}', tools=WEATHER, mode="forced")
    assert bare["calls"] == [("get_weather", {"city": "Bern"})]
    generic = read("generic", '{"name": "get_weather", "arguments": {"city": "Bern"}}', tools=WEATHER)
    assert generic["calls"] == [("get_weather", {"city": "Bern"})]
    raw = read("hermes", "<think>hmm</think>Hi", raw=True)
    assert raw["content"] == "<think>hmm</think>Hi" and raw["reasoning"] == ""


def test_stop_strings_cut_before_the_parser_sees_text() -> None:
    got = read("hermes", "<think>plan</think>Answer: 42. END and more", stop=("END",))
    assert got["reasoning"] == "plan" and got["content"] == "Answer: 42." and got["reason"] == "stop"


def test_template_kwargs_that_would_replace_the_conversation_are_refused() -> None:
    from sovereign.engine import ChatRequest
    from sovereign.engine.chat_template import ChatTemplate
    from sovereign.errors import InvalidRequest

    engine = Engine(None)  # type: ignore[arg-type]
    model = SimpleNamespace(
        template=ChatTemplate("{{ messages[0]['content'] }}", origin="catalog"), stops=(), format=FORMATS["generic"]
    )
    for key in ("messages", "tools", "self", "add_generation_prompt"):
        request = ChatRequest("m", [{"role": "user", "content": "hi"}], template_kwargs={key: 1})
        with pytest.raises(InvalidRequest) as error:
            engine._render_chat(model, request)  # type: ignore[arg-type]
        assert error.value.param == "chat_template_kwargs"
    segments, *_ = engine._render_chat(
        model, ChatRequest("m", [{"role": "user", "content": "hi"}], template_kwargs={"enable_thinking": False})
    )  # type: ignore[arg-type]
    assert "".join(s.text for s in segments) == "hi"


def test_a_reasoning_budget_forces_the_end_marker_once() -> None:
    forced: list[str] = []
    read("hermes", "<think>" + "step " * 30 + "</think>Done.", budget=5, forced=forced, seed=1)
    assert forced == ["</think>"]
    forced.clear()
    read("hermes", "<think>short</think>" + "answer " * 30, budget=5, forced=forced)
    assert forced == [], "a block that ends within budget needs nothing"
    read("deepseek_r1", "thinking " * 30, budget=3, forced=forced, in_reasoning=True)
    assert forced == ["</think>"], "a block the prompt opened counts from the first token"
