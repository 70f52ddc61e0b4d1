"""/v1/responses (stateless) against the real server and model, through the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import GEMMA
from tests.servers import ServerProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_create_with_a_string_and_with_items(client: OpenAI) -> None:
    response = client.responses.create(
        model=GEMMA, input="Tell me about the sea.", instructions="Be brief.", max_output_tokens=12, temperature=0
    )
    assert response.id.startswith("resp_") and response.object == "response" and response.model == GEMMA
    assert response.status in ("completed", "incomplete")
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.output_text == item.content[0].text
    assert response.usage.input_tokens > 5 and 0 < response.usage.output_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    items = client.responses.create(
        model=GEMMA,
        max_output_tokens=12,
        temperature=0,
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me about the sea."}]}],
    )
    assert items.output_text == response.output_text  # the same conversation, however it is spelled


def test_max_output_tokens_makes_the_response_incomplete(client: OpenAI) -> None:
    response = client.responses.create(
        model=GEMMA, input="Count to one hundred.", max_output_tokens=4, extra_body={"ignore_eos": True}
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4
    (message,) = response.output
    assert message.status == "incomplete" and response.output_text  # the text so far, marked cut, as OpenAI does


def test_stream_events_in_the_documented_order(client: OpenAI) -> None:
    plain = client.responses.create(model=GEMMA, input="Tell me about the sea.", max_output_tokens=16, temperature=0)
    with client.responses.stream(
        model=GEMMA, input="Tell me about the sea.", max_output_tokens=16, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response() if plain.status == "completed" else None
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == ("response.completed" if plain.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    assert (
        events[-1].response.id == events[0].response.id
        and events[-1].response.usage.output_tokens == plain.usage.output_tokens
    )
    if final is not None:
        assert final.output_text == plain.output_text


def test_json_schema_text_format_is_enforced(client: OpenAI) -> None:
    for seed in (1, 2):
        response = client.responses.create(
            model=GEMMA,
            input="A person, as JSON.",
            max_output_tokens=80,
            extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        )
        value = json.loads(response.output_text)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int) and 0 <= value["age"] <= 150
        assert response.text.format.type == "json_schema"


def test_function_tools_forced_then_answered(client: OpenAI) -> None:
    # Greedy: a random draw can spin out a long string argument and hit the token limit before the call closes.
    response = client.responses.create(
        model=GEMMA,
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=80,
        temperature=0,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and set(json.loads(call.arguments)) == {"city", "unit"}
    named = client.responses.create(
        model=GEMMA,
        input="Weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
        temperature=0,
    )
    assert [item.name for item in named.output if item.type == "function_call"] == ["get_weather"]
    with client.responses.stream(
        model=GEMMA,
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=80,
        temperature=0,
    ) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert streamed.output[0].type == "function_call" and json.loads(streamed.output[0].arguments)
    # The caller runs the function and sends the whole conversation back, the stateless way.
    follow = client.responses.create(
        model=GEMMA,
        tools=[WEATHER],
        max_output_tokens=12,
        temperature=0,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12 C, rain"},
        ],
    )
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > response.usage.input_tokens


def test_refusals_are_clear_400s(client: OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.create(model=GEMMA, input="Hi", previous_response_id="resp_123")
    assert stateful.value.code == "unsupported_parameter" and "stores no responses" in stateful.value.message
    with pytest.raises(openai.BadRequestError) as image:
        client.responses.create(
            model=GEMMA,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/cat.png"}]}],
        )
    assert "text only" in image.value.message
    # A built-in tool is dropped and reported (tests/test_responses_codex.py has the details); forcing one is refused.
    dropped = httpx.post(
        f"{server.base_url}/responses",
        json={"model": GEMMA, "input": "Hi", "max_output_tokens": 2, "tools": [{"type": "web_search"}]},
    )
    assert dropped.status_code == 200 and dropped.json()["sovereign_dropped_tools"] == ["web_search"]
    with pytest.raises(openai.BadRequestError) as builtin:
        client.responses.create(
            model=GEMMA, input="Hi", tools=[{"type": "web_search"}], tool_choice={"type": "web_search_preview"}
        )
    assert "web_search" in builtin.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope:1b", input="Hi")
    unknown = httpx.post(f"{server.base_url}/responses", json={"model": GEMMA, "input": "Hi", "frequency_penalty": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_parameter"
    assert client.responses.create(model=GEMMA, input="Hi", max_output_tokens=2).output  # still serving
