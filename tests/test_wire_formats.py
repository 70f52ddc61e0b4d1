"""Wire formats of all three APIs against the fake engine: shapes, event order and errors, in seconds.

The real-model tests (test_server_*, test_anthropic, test_responses) check the same routes with
gemma3:270m; here every answer is known in advance (tests/fake_engine.py), so the tests can say
exactly what the wire carries.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import anthropic
import httpx
import pytest
from openai import OpenAI

from sovereign.server.app import ServerOptions, create_app
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer

HELLO = [{"role": "user", "content": "hello there"}]
ANSWER = "You said: hello there"
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"echo": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def fake_server(fake: FakeEngine) -> Iterator[InProcessServer]:
    with InProcessServer(create_app(fake, ServerOptions(preload=("fake:model",)))) as running:
        yield running


@pytest.fixture(scope="module")
def openai_client(fake_server: InProcessServer) -> OpenAI:
    return OpenAI(base_url=fake_server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def anthropic_client(fake_server: InProcessServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake_server.url, api_key="unused", max_retries=0)


def sse(fake_server: InProcessServer, path: str, body: dict[str, object]) -> list[tuple[str | None, str]]:
    """(event name, data) of each frame of a streamed response."""
    frames: list[tuple[str | None, str]] = []
    with httpx.stream("POST", f"{fake_server.url}{path}", json={**body, "stream": True}, timeout=10) as response:
        assert response.status_code == 200, response.read()
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                frames.append((name, line[6:]))
                name = None
    return frames


# --- OpenAI chat completions ---------------------------------------------------------------


def test_chat_completion_shape(openai_client: OpenAI) -> None:
    completion = openai_client.chat.completions.create(model="fake:model", messages=HELLO)  # type: ignore[arg-type]
    assert (
        completion.id.startswith("chatcmpl")
        and completion.object == "chat.completion"
        and completion.model == "fake:model"
    )
    (choice,) = completion.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4


def test_chat_stream_chunks_in_order(fake_server: InProcessServer) -> None:
    frames = sse(
        fake_server,
        "/v1/chat/completions",
        {"model": "fake:model", "messages": HELLO, "stream_options": {"include_usage": True}},
    )
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "chat.completion.chunk" for c in chunks)


def test_max_tokens_and_stop(openai_client: OpenAI) -> None:
    cut = openai_client.chat.completions.create(model="fake:model", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert cut.choices[0].message.content == "You said:" and cut.choices[0].finish_reason == "length"
    stopped = openai_client.chat.completions.create(model="fake:model", messages=HELLO, stop=[" there"])  # type: ignore[arg-type]
    assert stopped.choices[0].message.content == "You said: hello" and stopped.choices[0].finish_reason == "stop"


def test_n_choices_each_complete(openai_client: OpenAI) -> None:
    completion = openai_client.chat.completions.create(model="fake:model", messages=HELLO, n=3)  # type: ignore[arg-type]
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.message.content == ANSWER for c in completion.choices)


def test_forced_tool_call_plain_and_streamed(openai_client: OpenAI) -> None:
    plain = openai_client.chat.completions.create(
        model="fake:model", messages=HELLO, tools=[TOOL], tool_choice="required"
    )  # type: ignore[arg-type,list-item]
    (call,) = plain.choices[0].message.tool_calls or []
    assert plain.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"echo": "hello there"}
    with openai_client.chat.completions.stream(
        model="fake:model", messages=HELLO, tools=[TOOL], tool_choice="required"
    ) as stream:  # type: ignore[arg-type,list-item]
        final = stream.get_final_completion()
    streamed = (final.choices[0].message.tool_calls or [])[0]
    assert streamed.id == call.id and streamed.function.arguments == call.function.arguments


# --- OpenAI completions, embeddings, models, tokenizer ------------------------------------------


def test_completion_and_echo(openai_client: OpenAI) -> None:
    completion = openai_client.completions.create(model="fake:model", prompt="hi", echo=True)
    assert completion.object == "text_completion" and completion.choices[0].text == "hiYou said: hi"


def test_embeddings_float_and_base64(openai_client: OpenAI, fake_server: InProcessServer) -> None:
    floats = openai_client.embeddings.create(model="fake:model", input=["a", "b"])
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 8
    raw = httpx.post(
        f"{fake_server.base_url}/embeddings", json={"model": "fake:model", "input": "a", "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats.data[0].embedding, rel=1e-6)


def test_models_and_tokenizer(fake_server: InProcessServer) -> None:
    listed = httpx.get(f"{fake_server.base_url}/models").json()
    assert {m["id"] for m in listed["data"]} >= {"fake:model"} and listed["object"] == "list"
    one = httpx.get(f"{fake_server.base_url}/models/fake:model").json()
    assert one["context_length"] == 4096 and one["object"] == "model"
    tokens = httpx.post(f"{fake_server.url}/tokenize", json={"content": "hi", "with_pieces": True}).json()["tokens"]
    assert tokens == [{"id": 104, "piece": "h"}, {"id": 105, "piece": "i"}]
    assert httpx.post(f"{fake_server.url}/detokenize", json={"tokens": [104, 105]}).json() == {"content": "hi"}
    bad = httpx.post(f"{fake_server.url}/detokenize", json={"tokens": [100000]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# --- Anthropic Messages ---------------------------------------------------------------------


def test_anthropic_message_and_event_order(anthropic_client: anthropic.Anthropic, fake_server: InProcessServer) -> None:
    message = anthropic_client.messages.create(model="fake:model", max_tokens=50, messages=HELLO)  # type: ignore[arg-type]
    assert message.type == "message" and message.content[0].text == ANSWER and message.stop_reason == "end_turn"  # type: ignore[union-attr]
    frames = sse(fake_server, "/v1/messages", {"model": "fake:model", "max_tokens": 50, "messages": HELLO})
    names = [name for name, _ in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(json.loads(data)["type"] == name for name, data in frames)
    deltas = "".join(json.loads(data)["delta"]["text"] for name, data in frames if name == "content_block_delta")
    assert deltas == ANSWER


def test_anthropic_forced_tool_use(anthropic_client: anthropic.Anthropic) -> None:
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {"echo": {"type": "string"}}}}
    message = anthropic_client.messages.create(
        model="fake:model", max_tokens=50, messages=HELLO, tools=[tool], tool_choice={"type": "any"}
    )  # type: ignore[arg-type,list-item]
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "lookup" and block.input == {"echo": "hello there"}
    assert message.stop_reason == "tool_use"


# --- Responses ------------------------------------------------------------------------------


def test_responses_create_and_events(openai_client: OpenAI, fake_server: InProcessServer) -> None:
    response = openai_client.responses.create(model="fake:model", input="hello there")
    assert response.status == "completed" and response.output_text == ANSWER
    frames = sse(fake_server, "/v1/responses", {"model": "fake:model", "input": "hello there"})
    kinds = [json.loads(data)["type"] for _, data in frames]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    numbers = [json.loads(data)["sequence_number"] for _, data in frames]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_model_in_each_envelope(fake_server: InProcessServer) -> None:
    openai_style = httpx.post(
        f"{fake_server.base_url}/chat/completions", json={"model": "missing:model", "messages": HELLO}
    )
    assert openai_style.status_code == 404 and openai_style.json()["error"]["code"] == "model_not_found"
    anthropic_style = httpx.post(
        f"{fake_server.base_url}/messages", json={"model": "missing:model", "max_tokens": 5, "messages": HELLO}
    )
    assert anthropic_style.status_code == 404
    assert anthropic_style.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": anthropic_style.json()["error"]["message"]},
    }


def test_busy_is_503_with_retry_after_and_529_for_anthropic(fake_server: InProcessServer) -> None:
    openai_style = httpx.post(
        f"{fake_server.base_url}/chat/completions", json={"model": "busy:model", "messages": HELLO}
    )
    assert openai_style.status_code == 503 and openai_style.headers["retry-after"] == "2"
    assert openai_style.json()["error"]["code"] == "server_overloaded"
    anthropic_style = httpx.post(
        f"{fake_server.base_url}/messages", json={"model": "busy:model", "max_tokens": 5, "messages": HELLO}
    )
    assert anthropic_style.status_code == 529 and anthropic_style.json()["error"]["type"] == "overloaded_error"


def test_a_crash_mid_answer_is_the_apis_own_error(fake_server: InProcessServer) -> None:
    plain = httpx.post(f"{fake_server.base_url}/chat/completions", json={"model": "crashing:model", "messages": HELLO})
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "model_crashed"
    assert "SIGSEGV" in plain.json()["error"]["message"]
    frames = sse(fake_server, "/v1/chat/completions", {"model": "crashing:model", "messages": HELLO})
    last = json.loads(frames[-1][1]) if frames[-1][1] != "[DONE]" else json.loads(frames[-2][1])
    assert last["error"]["code"] == "model_crashed"
    events = sse(fake_server, "/v1/messages", {"model": "crashing:model", "max_tokens": 50, "messages": HELLO})
    assert events[-1][0] == "error" and json.loads(events[-1][1])["error"]["type"] == "api_error"
    responses = sse(fake_server, "/v1/responses", {"model": "crashing:model", "input": "hello there"})
    assert json.loads(responses[-1][1])["type"] == "response.failed"
    assert httpx.get(f"{fake_server.url}/health").json()["status"] == "ok"


# --- reasoning, on every API ----------------------------------------------------------------

THINK = [{"role": "user", "content": "think hard"}]
THOUGHT = "Thinking about think hard."


def test_reasoning_content_in_chat_completions(openai_client: OpenAI, fake_server: InProcessServer) -> None:
    completion = openai_client.chat.completions.create(model="fake:model", messages=THINK)  # type: ignore[arg-type]
    message = completion.choices[0].message
    assert message.content == "You said: think hard"
    assert message.model_extra is not None and message.model_extra["reasoning_content"] == THOUGHT
    frames = sse(fake_server, "/v1/chat/completions", {"model": "fake:model", "messages": THINK})
    deltas = [json.loads(data)["choices"][0]["delta"] for _, data in frames[:-1]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == THOUGHT
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:]), "reasoning comes before the answer"


def test_thinking_blocks_in_messages(anthropic_client: anthropic.Anthropic, fake_server: InProcessServer) -> None:
    message = anthropic_client.messages.create(model="fake:model", max_tokens=50, messages=THINK)  # type: ignore[arg-type]
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == THOUGHT
    assert text.type == "text" and text.text == "You said: think hard"
    with anthropic_client.messages.stream(model="fake:model", max_tokens=50, messages=THINK) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THOUGHT  # type: ignore[union-attr]
    frames = sse(fake_server, "/v1/messages", {"model": "fake:model", "max_tokens": 50, "messages": THINK})
    kinds = [
        (name, json.loads(data).get("delta", {}).get("type") or json.loads(data).get("content_block", {}).get("type"))
        for name, data in frames
    ]
    assert kinds[:3] == [("message_start", None), ("content_block_start", "thinking"), ("ping", None)]
    assert ("content_block_start", "text") in kinds
    starts = [i for i, (name, _) in enumerate(kinds) if name == "content_block_start"]
    assert kinds[starts[1] - 1] == ("content_block_stop", None), "the thinking block closes before the text opens"


def test_reasoning_item_in_responses(openai_client: OpenAI, fake_server: InProcessServer) -> None:
    response = openai_client.responses.create(model="fake:model", input="think hard")
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == THOUGHT  # type: ignore[union-attr]
    assert message.type == "message" and response.output_text == "You said: think hard"
    with openai_client.responses.stream(model="fake:model", input="think hard") as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message"]
    frames = sse(fake_server, "/v1/responses", {"model": "fake:model", "input": "think hard"})
    kinds = [json.loads(data)["type"] for _, data in frames]
    deltas = "".join(
        json.loads(data)["delta"]
        for _, data in frames
        if json.loads(data)["type"] == "response.reasoning_summary_text.delta"
    )
    assert deltas == THOUGHT
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index("response.output_text.delta")


def test_reasoning_in_history_reaches_the_template(
    openai_client: OpenAI, anthropic_client: anthropic.Anthropic, fake: FakeEngine
) -> None:
    """Reasoning a client hands back is the assistant message's reasoning_content, which reasoning templates read."""
    history = [
        *THINK,
        {"role": "assistant", "content": "You said: think hard", "reasoning_content": THOUGHT},
        {"role": "user", "content": "and now?"},
    ]
    openai_client.chat.completions.create(model="fake:model", messages=history)  # type: ignore[arg-type]
    assert fake.requests[-1].messages[1] == {
        "role": "assistant",
        "content": "You said: think hard",
        "reasoning_content": THOUGHT,
    }
    blocks = [
        {"type": "thinking", "thinking": THOUGHT, "signature": ""},
        {"type": "text", "text": "You said: think hard"},
    ]
    anthropic_client.messages.create(
        model="fake:model",
        max_tokens=20,
        messages=[*THINK, {"role": "assistant", "content": blocks}, {"role": "user", "content": "and now?"}],
    )  # type: ignore[list-item]
    assert fake.requests[-1].messages[1] == {
        "role": "assistant",
        "content": "You said: think hard",
        "reasoning_content": THOUGHT,
    }


def test_reasoning_controls_reach_the_request(
    openai_client: OpenAI, anthropic_client: anthropic.Anthropic, fake: FakeEngine
) -> None:
    openai_client.chat.completions.create(
        model="fake:model", messages=HELLO, reasoning_effort="none", extra_body={"chat_template_kwargs": {"custom": 1}}
    )  # type: ignore[arg-type]
    sent = fake.requests[-1]
    assert sent.all_template_kwargs() == {"enable_thinking": False, "thinking": False, "custom": 1}  # type: ignore[union-attr]
    openai_client.chat.completions.create(
        model="fake:model",
        messages=HELLO,
        reasoning_effort="high",
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )  # type: ignore[arg-type]
    assert fake.requests[-1].all_template_kwargs() == {"reasoning_effort": "high", "enable_thinking": True}  # type: ignore[union-attr]
    anthropic_client.messages.create(
        model="fake:model", max_tokens=20, messages=HELLO, thinking={"type": "enabled", "budget_tokens": 1024}
    )  # type: ignore[arg-type]
    control = fake.requests[-1].reasoning  # type: ignore[union-attr]
    assert control.enabled is True and control.budget_tokens == 1024
    anthropic_client.messages.create(model="fake:model", max_tokens=20, messages=HELLO, thinking={"type": "disabled"})  # type: ignore[arg-type]
    assert fake.requests[-1].reasoning.enabled is False  # type: ignore[union-attr]
    openai_client.responses.create(model="fake:model", input="hi", reasoning={"effort": "low"})
    assert fake.requests[-1].reasoning.effort == "low"  # type: ignore[union-attr]


def test_parallel_tool_calls_flag_reaches_the_request(
    openai_client: OpenAI, anthropic_client: anthropic.Anthropic, fake: FakeEngine
) -> None:
    openai_client.chat.completions.create(model="fake:model", messages=HELLO, tools=[TOOL], parallel_tool_calls=False)  # type: ignore[arg-type,list-item]
    assert fake.requests[-1].parallel_tool_calls is False  # type: ignore[union-attr]
    openai_client.chat.completions.create(model="fake:model", messages=HELLO, tools=[TOOL])  # type: ignore[arg-type,list-item]
    assert fake.requests[-1].parallel_tool_calls is True  # type: ignore[union-attr]
    tool = {"name": "lookup", "input_schema": {"type": "object"}}
    anthropic_client.messages.create(
        model="fake:model",
        max_tokens=20,
        messages=HELLO,
        tools=[tool],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )  # type: ignore[arg-type,list-item]
    assert fake.requests[-1].parallel_tool_calls is False  # type: ignore[union-attr]


# --- tool calls streamed as the model writes them -------------------------------------------------

CALL = [{"role": "user", "content": "call me"}]
CALL_ARGS = {"echo": "call me"}


def test_streamed_tool_call_arguments_in_chat_completions(openai_client: OpenAI, fake_server: InProcessServer) -> None:
    frames = sse(fake_server, "/v1/chat/completions", {"model": "fake:model", "messages": CALL, "tools": [TOOL]})
    pieces = [
        c["choices"][0]["delta"].get("tool_calls") for c in (json.loads(d) for _, d in frames[:-1]) if c["choices"]
    ]
    pieces = [p[0] for p in pieces if p]
    assert pieces[0]["function"] == {"name": "lookup", "arguments": ""} and pieces[0]["index"] == 0
    assert len(pieces) > 2 and json.loads("".join(p["function"]["arguments"] for p in pieces)) == CALL_ARGS
    with openai_client.chat.completions.stream(model="fake:model", messages=CALL, tools=[TOOL]) as stream:  # type: ignore[arg-type,list-item]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == CALL_ARGS
    assert final.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_use_input_in_messages(
    anthropic_client: anthropic.Anthropic, fake_server: InProcessServer
) -> None:
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {"echo": {"type": "string"}}}}
    body = {"model": "fake:model", "max_tokens": 50, "messages": CALL, "tools": [tool]}
    frames = sse(fake_server, "/v1/messages", body)
    deltas = [json.loads(d)["delta"]["partial_json"] for n, d in frames if n == "content_block_delta"]
    assert len(deltas) > 2 and json.loads("".join(deltas)) == CALL_ARGS
    with anthropic_client.messages.stream(model="fake:model", max_tokens=50, messages=CALL, tools=[tool]) as stream:  # type: ignore[arg-type,list-item]
        final = stream.get_final_message()
    (block,) = final.content
    assert block.type == "tool_use" and block.input == CALL_ARGS and final.stop_reason == "tool_use"


def test_streamed_function_call_in_responses(openai_client: OpenAI, fake_server: InProcessServer) -> None:
    tool = {
        "type": "function",
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"echo": {"type": "string"}}},
    }
    frames = sse(fake_server, "/v1/responses", {"model": "fake:model", "input": "call me", "tools": [tool]})
    events = [json.loads(d) for _, d in frames]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 2 and json.loads("".join(deltas)) == CALL_ARGS
    with openai_client.responses.stream(model="fake:model", input="call me", tools=[tool]) as stream:  # type: ignore[list-item]
        final = stream.get_final_response()
    (item,) = final.output
    assert item.type == "function_call" and item.name == "lookup" and json.loads(item.arguments) == CALL_ARGS  # type: ignore[union-attr]


def test_a_message_cut_off_while_reasoning_has_no_empty_text_block() -> None:
    """Streamed, such an answer is one thinking block; whole, it must be the same.

    Anthropic refuses empty text blocks.
    """
    from sovereign.engine import Finished, Usage
    from sovereign.server.anthropic_convert import message_json

    message = message_json("msg_1", "m", "", [], Finished("length", Usage(3, 8)), None, "still thinking")
    assert message["content"] == [{"type": "thinking", "thinking": "still thinking", "signature": ""}]
    assert message["stop_reason"] == "max_tokens"


def test_tools_reach_the_engine_as_the_client_wrote_them(
    openai_client: OpenAI, anthropic_client: anthropic.Anthropic, fake: FakeEngine
) -> None:
    """Key order kept and nothing added: templates render tools as JSON, and models learnt their clients' order."""
    schema = {"properties": {"city": {"type": "string"}}, "type": "object", "required": ["city"]}
    sent = [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Now.", "parameters": schema, "strict": True},
        },
        {"function": {"parameters": schema, "name": "time"}, "type": "function"},  # an odd order, no description
    ]
    openai_client.chat.completions.create(model="fake:model", messages=HELLO, tools=sent)  # type: ignore[arg-type]
    assert json.dumps(fake.requests[-1].tools) == json.dumps(sent)
    anthropic_client.messages.create(
        model="fake:model",
        max_tokens=16,
        messages=[{"role": "user", "content": "hello"}],
        tools=[{"name": "weather", "description": "Now.", "input_schema": schema}],
    )
    expected = [{"type": "function", "function": {"name": "weather", "description": "Now.", "parameters": schema}}]
    assert json.dumps(fake.requests[-1].tools) == json.dumps(expected), "OpenAI's order: name, description, parameters"
