"""/v1/chat/completions against the real server and model, through the official openai client.

The model is a 270M base model: its prose is poor, so these tests assert structure and
behaviour (determinism, budgets, constraints), never wording.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

from tests.conftest import GEMMA
from tests.servers import ServerProcess

HELLO = [{"role": "user", "content": "Tell me about the sea."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def chat(client: OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=GEMMA, **{"messages": HELLO, "max_tokens": 16, **kwargs})


def greedy_text(client: OpenAI, **kwargs: Any) -> str:
    return chat(client, temperature=0, **kwargs).choices[0].message.content


def test_non_streamed_shape(client: OpenAI) -> None:
    response = chat(client)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == GEMMA
    (choice,) = response.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chunks_reassemble_to_the_same_answer(client: OpenAI) -> None:
    whole = greedy_text(client)
    stream = chat(client, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_ends_with_done(server: ServerProcess) -> None:
    body = {"model": GEMMA, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:])  # no usage chunk unless include_usage


def test_async_client_streamed_and_not(server: ServerProcess) -> None:
    async def main() -> tuple[list[str], str]:
        client = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        plain = await asyncio.gather(
            *(
                client.chat.completions.create(model=GEMMA, messages=HELLO, max_tokens=8, temperature=0)
                for _ in range(3)
            )
        )
        stream = await client.chat.completions.create(
            model=GEMMA, messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        await client.close()
        return [p.choices[0].message.content for p in plain], streamed

    texts, streamed = asyncio.run(main())
    assert len(set(texts)) == 1, "greedy answers to concurrent identical requests agree"
    assert streamed == texts[0]


def test_max_tokens_and_max_completion_tokens(client: OpenAI) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        response = client.chat.completions.create(
            model=GEMMA, messages=HELLO, extra_body={"ignore_eos": True}, **{key: 5}
        )
        assert response.usage.completion_tokens == 5
        assert response.choices[0].finish_reason == "length"


def test_ignore_eos_generates_the_full_budget(client: OpenAI) -> None:
    # With the end-of-turn token allowed, this short prompt usually ends early; with ignore_eos it never does.
    response = chat(client, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 40 and response.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable(client: OpenAI) -> None:
    # The first call fills the prefix cache; llama.cpp's logits for a token decoded alone can differ in the
    # last bits from the same token decoded within its whole prompt, so repeats are compared cache hit to cache hit.
    chat(client, temperature=1.2, seed=7, max_tokens=1)
    first = chat(client, temperature=1.2, seed=7, max_tokens=24).choices[0].message.content
    again = chat(client, temperature=1.2, seed=7, max_tokens=24).choices[0].message.content
    others = {chat(client, temperature=1.2, seed=s, max_tokens=24).choices[0].message.content for s in (8, 9, 10)}
    assert first == again
    assert len(others | {first}) > 1, "different seeds give different samples"


def test_stop_string_and_list(client: OpenAI) -> None:
    baseline = greedy_text(client, max_tokens=24, extra_body={"ignore_eos": True})
    assert len(baseline) > 8
    cut = baseline[4:7]
    expected = baseline[: baseline.index(cut)]
    for stop in (cut, [cut, "never-appears-anywhere"]):
        response = chat(client, temperature=0, max_tokens=24, stop=stop, extra_body={"ignore_eos": True})
        assert response.choices[0].message.content == expected
        assert response.choices[0].finish_reason == "stop"


def test_truncation_samplers_reduce_to_greedy(client: OpenAI) -> None:
    greedy = greedy_text(client, max_tokens=12)
    assert greedy_text(client, max_tokens=12) == greedy
    assert (
        chat(client, temperature=1.5, seed=1, max_tokens=12, extra_body={"top_k": 1}).choices[0].message.content
        == greedy
    )
    assert (
        chat(client, temperature=1.5, seed=1, max_tokens=12, extra_body={"min_p": 1.0}).choices[0].message.content
        == greedy
    )
    assert chat(client, temperature=1.5, seed=1, max_tokens=12, top_p=1e-6).choices[0].message.content == greedy


@pytest.mark.parametrize(
    "penalty", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repeat_penalty": 2.0}}]
)
def test_penalties_change_the_output(client: OpenAI, penalty: dict[str, Any]) -> None:
    # The base model repeats itself under greedy decoding; penalising repeats must change that.
    plain = greedy_text(client, max_tokens=40, extra_body={"ignore_eos": True})
    extra = {**penalty.pop("extra_body", {}), "ignore_eos": True}
    penalised = greedy_text(client, max_tokens=40, extra_body=extra, **penalty)
    assert penalised != plain


def test_logit_bias_bans_and_forces_tokens(client: OpenAI, server: ServerProcess) -> None:
    greedy = chat(client, temperature=0, max_tokens=1, logprobs=True).choices[0].logprobs.content[0].token
    first_id = httpx.post(f"{server.url}/tokenize", json={"content": greedy}).json()["tokens"][0]
    banned = chat(client, temperature=0, max_tokens=1, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != greedy
    forced_id = httpx.post(f"{server.url}/tokenize", json={"content": " ocean"}).json()["tokens"][-1]
    forced = chat(
        client, temperature=0, max_tokens=3, logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True}
    )
    piece = httpx.post(f"{server.url}/detokenize", json={"tokens": [forced_id]}).json()["content"]
    assert forced.choices[0].message.content == piece * 3


def test_logprobs_and_top_logprobs(client: OpenAI) -> None:
    response = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert item.token == item.top_logprobs[0].token, "greedy picks the most likely token"
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_n_choices(client: OpenAI) -> None:
    response = chat(client, n=3, temperature=1.3, seed=11, max_tokens=12)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1
    assert response.usage.completion_tokens >= 3, "usage counts every choice's tokens"
    stream = chat(client, n=2, temperature=1.3, seed=11, max_tokens=6, stream=True)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_json_object_output_parses(client: OpenAI) -> None:
    # The grammar admits only a JSON object: every answer that ends by itself parses, and a
    # budget-truncated one is a prefix of one. A small model sometimes rambles past the budget.
    finished = 0
    for seed in (1, 2, 3, 4):
        response = chat(
            client,
            max_tokens=120,
            temperature=0.7,
            seed=seed,
            response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        )
        content = response.choices[0].message.content
        assert content.lstrip().startswith("{")
        if response.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
            finished += 1
    assert finished >= 1


def test_json_schema_output_matches_the_schema(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    for seed in (1, 2):
        response = chat(
            client,
            max_tokens=120,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema, "strict": True},
            },
        )
        value = json.loads(response.choices[0].message.content)
        assert set(value) == {"name", "age", "tags"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 20
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
        assert all(tag in ("a", "b") for tag in value["tags"]) and len(value["tags"]) <= 3


def test_tool_choice_required_forces_a_valid_call(client: OpenAI) -> None:
    # Seeded: a random draw can spin out a long string argument and hit max_tokens before the call closes.
    response = chat(
        client,
        max_tokens=60,
        seed=3,
        messages=[{"role": "user", "content": "Hello there"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == ({"city", "unit"} if call.function.name == "get_weather" else {"zone"})


def test_a_forced_call_cut_by_max_tokens_is_still_a_tool_call(client: OpenAI) -> None:
    """As OpenAI answers: the call with its arguments as far as they got, and finish_reason "length"."""
    response = chat(
        client, max_tokens=14, seed=3, tools=[WEATHER_TOOL], tool_choice="required"
    )  # past the name, within the arguments
    choice = response.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content, choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith("{"), call


def test_tools_with_a_response_format_are_accepted(client: OpenAI) -> None:
    """The OpenAI Agents SDK sends both for an agent with tools and an output type: the schema holds the text turn."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    forced = chat(
        client, max_tokens=60, seed=3, tools=[WEATHER_TOOL], tool_choice="required", response_format=response_format
    ).choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls[0].function.name == "get_weather"
    auto = chat(
        client, max_tokens=60, seed=3, tools=[WEATHER_TOOL], tool_choice="auto", response_format=response_format
    ).choices[0]
    if auto.message.tool_calls:
        assert json.loads(auto.message.tool_calls[0].function.arguments) is not None
    else:
        assert set(json.loads(auto.message.content)) == {"answer"}, auto.message.content


def test_named_tool_choice_forces_that_function(client: OpenAI) -> None:
    for name in ("get_time", "get_weather"):
        response = chat(
            client,
            max_tokens=60,
            seed=3,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "function", "function": {"name": name}},
        )
        (call,) = response.choices[0].message.tool_calls
        assert call.function.name == name
        json.loads(call.function.arguments)


def test_streamed_tool_call_is_reassembled_by_the_sdk(client: OpenAI) -> None:
    with client.chat.completions.stream(
        model=GEMMA, messages=HELLO, max_tokens=60, seed=3, tools=[WEATHER_TOOL], tool_choice="required"
    ) as stream:
        for _event in stream:
            pass
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] in ("c", "f")
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_and_none(client: OpenAI) -> None:
    auto = chat(client, max_tokens=40, tools=[WEATHER_TOOL], tool_choice="auto").choices[0]
    if auto.message.tool_calls:  # the model may call or answer; either way the shape is right
        assert (
            auto.finish_reason == "tool_calls" and json.loads(auto.message.tool_calls[0].function.arguments) is not None
        )
    else:
        assert isinstance(auto.message.content, str) and auto.finish_reason in ("stop", "length")
    none = chat(client, max_tokens=16, tools=[WEATHER_TOOL], tool_choice="none").choices[0]
    assert not none.message.tool_calls and isinstance(none.message.content, str)


def test_a_tool_result_turn_continues_the_conversation(client: OpenAI) -> None:
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'},
    ]
    response = chat(client, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=12)
    assert isinstance(response.choices[0].message.content, str)


def test_system_and_developer_messages_and_content_parts(client: OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
    ]
    assert isinstance(chat(client, messages=messages).choices[0].message.content, str)
    with pytest.raises(BadRequestError) as error:
        chat(
            client,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )
    assert error.value.body["param"] == "messages.0.content.0"
