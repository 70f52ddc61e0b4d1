"""Between OpenAI's Responses API and the engine: bodies to chat requests, events to responses and stream events.

Stateless: every request carries the whole conversation in `input`; previous_response_id is refused.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from sovereign.engine import ChatRequest, Finished, ReasoningDelta, SamplingParams, TextDelta, ToolCall, ToolCallDelta, ToolCallsEvent, ToolChoice, Usage
from sovereign.engine.requests import Event
from sovereign.engine.tools import function_tool
from sovereign.server.errors import APIError, from_exception
from sovereign.server.openai_convert import reasoning_from_effort
from sovereign.server.schemas import NamedFunction, ResponsesBody, ResponsesFunctionTool
from sovereign.server.sse import named_event as sse

TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def chat_request_from(body: ResponsesBody) -> ChatRequest:
    """The engine request for a Responses body."""
    if body.previous_response_id or body.conversation:
        param = "previous_response_id" if body.previous_response_id else "conversation"
        raise APIError(400, f"This server stores no responses or conversations, so '{param}' cannot be used: send the whole conversation in 'input'.", param=param, code="unsupported_parameter")
    if body.background:
        raise APIError(400, "Background responses need stored state, which this server does not keep.", param="background", code="unsupported_parameter")
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + _messages(body.input)
    tools = _tools(body)
    choice = _tool_choice(body, bool(tools))
    json_schema, json_object = _text_format(body)
    if tools and choice.mode in ("required", "function") and (json_schema or json_object):
        raise APIError(400, "A forced tool call cannot be combined with a JSON text.format.", param="text.format", code="invalid_value")
    defaults = SamplingParams()
    sampling = SamplingParams(
        max_tokens=body.max_output_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    reasoning = reasoning_from_effort(body.reasoning.effort if body.reasoning else None)
    return ChatRequest(
        body.model, messages, sampling, tools, choice, json_schema, json_object, format_param="text.format", reasoning=reasoning,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as the engine's OpenAI-shaped chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise APIError(400, "input must not be empty.", param="input", code="invalid_value")
    out: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"input.{index}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer.", param=f"{where}.role", code="invalid_value")
            out.append({"role": "system" if role == "developer" else role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id", "")), "type": "function", "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", "{}"))}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": _text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue  # a reasoning model's notes, handed back by clients: nothing here reads them
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item references need stored responses, which this server does not keep.", param=where, code="unsupported_parameter")
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported.", param=f"{where}.type", code="invalid_value")
    return out


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text parts.", param=where, code="invalid_type")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}.{index}: this model reads text only; got a part of type {kind!r}.", param=f"{where}.{index}", code="invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)


def _tools(body: ResponsesBody) -> list[dict[str, Any]]:
    tools = []
    for index, raw in enumerate(body.tools or []):
        if raw.get("type") != "function":
            raise APIError(400, f"tools.{index}: built-in tool {raw.get('type')!r} is not available here; define a function tool.", param=f"tools.{index}.type", code="invalid_value")
        try:
            tool = ResponsesFunctionTool.model_validate(raw)
        except ValueError as exc:
            raise APIError(400, f"tools.{index} is not a valid function tool: {exc}", param=f"tools.{index}", code="invalid_value") from None
        tools.append(function_tool(tool.name, tool.description, tool.parameters or {"type": "object", "properties": {}}))
    return tools


def _tool_choice(body: ResponsesBody, has_tools: bool) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if has_tools else "none")
    if choice != "none" and not has_tools:
        raise APIError(400, "tool_choice is set but no tools were given.", param="tool_choice", code="invalid_value")
    if isinstance(choice, NamedFunction):
        return ToolChoice("function", choice.name)  # the engine refuses a name that is not among the tools
    return ToolChoice(choice)


def _text_format(body: ResponsesBody) -> tuple[dict[str, Any] | None, bool]:
    """(json_schema, json_object) from text.format."""
    text_format = body.text.format if body.text else None
    if text_format is None or text_format.type == "text":
        return None, False
    if text_format.type == "json_object":
        return None, True
    if text_format.schema_ is None:
        raise APIError(400, "text.format of type json_schema needs a schema.", param="text.format.schema", code="missing_required_parameter")
    return text_format.schema_, False


# --- responses ---------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(call: ToolCall, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
    return {
        "type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id, "name": call.name,
        "arguments": call.arguments if arguments is None else arguments, "status": status,
    }


class ResponseShell:
    """The fields of a Response that echo the request; output, status and usage are filled in as they are known."""

    def __init__(self, body: ResponsesBody, model: str) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.body = body
        self.model = model

    def json(self, status: str, output: list[dict[str, Any]], finished: Finished | None = None) -> dict[str, Any]:
        body = self.body
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {"type": "text"}
        tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunction) else (body.tool_choice or "auto")
        incomplete = finished is not None and finished.reason == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "tool_choice": tool_choice,
            "tools": [{**t, "parameters": t.get("parameters"), "strict": t.get("strict")} for t in body.tools or []],
            "text": {"format": text_format},
            "previous_response_id": None, "store": False, "truncation": "disabled", "metadata": body.metadata or {},
            "user": body.user, "usage": usage_json(finished.usage) if finished else None,
        }


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    """The model's reasoning as a reasoning item: its text in full (nothing is summarised locally)."""
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}] if text else [], "status": "completed"}


def output_items(text: str, calls: list[ToolCall], reasoning: str = "") -> list[dict[str, Any]]:
    """A finished answer's output: its reasoning, the message (when there is text, or nothing else), then the function calls."""
    items = [reasoning_item(new_id("rs"), reasoning)] if reasoning else []
    items += [message_item(new_id("msg"), text, "completed")] if text or not calls else []
    return items + [call_item(call) for call in calls]


async def stream_events(shell: ResponseShell, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """The documented sequence: created, in_progress, per item added/deltas/done, then completed (or incomplete/failed)."""
    sequence = 0
    output: list[dict[str, Any]] = []
    message: dict[str, Any] | None = None  # the message item being streamed
    text = ""
    thought: dict[str, Any] | None = None  # the reasoning item being streamed
    reasoning = ""
    calling: tuple[int, ToolCall] | None = None  # the engine's index and the call being streamed (arguments so far)
    streamed: set[str] = set()  # ids of calls already streamed as items

    def frame(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        event = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return sse(event)

    def open_message() -> list[bytes]:
        nonlocal message
        message = message_item(new_id("msg"), "", "in_progress")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            frame("response.output_item.added", output_index=len(output), item=message),
            frame("response.content_part.added", item_id=message["id"], output_index=len(output), content_index=0, part=part),
        ]

    def close_message() -> list[bytes]:
        nonlocal message
        assert message is not None
        done = message_item(message["id"], text, "completed")
        part = done["content"][0]
        index = len(output)
        frames = [
            frame("response.output_text.done", item_id=done["id"], output_index=index, content_index=0, text=text, logprobs=[]),
            frame("response.content_part.done", item_id=done["id"], output_index=index, content_index=0, part=part),
            frame("response.output_item.done", output_index=index, item=done),
        ]
        output.append(done)
        message = None
        return frames

    def open_reasoning() -> list[bytes]:
        nonlocal thought
        thought = {"type": "reasoning", "id": new_id("rs"), "summary": [], "status": "in_progress"}
        return [
            frame("response.output_item.added", output_index=len(output), item=thought),
            frame("response.reasoning_summary_part.added", item_id=thought["id"], output_index=len(output), summary_index=0, part={"type": "summary_text", "text": ""}),
        ]

    def close_reasoning() -> list[bytes]:
        nonlocal thought
        assert thought is not None
        done = reasoning_item(thought["id"], reasoning)
        index = len(output)
        frames = [
            frame("response.reasoning_summary_text.done", item_id=done["id"], output_index=index, summary_index=0, text=reasoning),
            frame("response.reasoning_summary_part.done", item_id=done["id"], output_index=index, summary_index=0, part={"type": "summary_text", "text": reasoning}),
            frame("response.output_item.done", output_index=index, item=done),
        ]
        output.append(done)
        thought = None
        return frames

    def close_call() -> list[bytes]:
        nonlocal calling
        assert calling is not None
        call, index = calling[1], len(output)
        done = call_item(call)
        calling = None
        output.append(done)
        return [
            frame("response.function_call_arguments.done", item_id=done["id"], output_index=index, arguments=call.arguments),
            frame("response.output_item.done", output_index=index, item=done),
        ]

    yield frame("response.created", response=shell.json("in_progress", []))
    yield frame("response.in_progress", response=shell.json("in_progress", []))
    try:
        async for event in events:
            if not isinstance(event, ReasoningDelta) and thought is not None:  # reasoning comes first and ends before the answer
                for chunk in close_reasoning():
                    yield chunk
            if calling is not None and not (isinstance(event, ToolCallDelta) and event.id is None):
                for chunk in close_call():
                    yield chunk
            if isinstance(event, ToolCallDelta):
                if event.id is not None:  # a call begins: its item, then its arguments as the model writes them
                    if message is not None:
                        for chunk in close_message():
                            yield chunk
                    calling = (event.index, ToolCall(event.id, event.name or "", ""))
                    streamed.add(event.id)
                    yield frame("response.output_item.added", output_index=len(output), item=call_item(calling[1], "in_progress", ""))
                elif calling is not None and calling[0] == event.index and event.arguments:
                    call = calling[1]
                    calling = (event.index, ToolCall(call.id, call.name, call.arguments + event.arguments))
                    yield frame("response.function_call_arguments.delta", item_id=call_item(call)["id"], output_index=len(output), delta=event.arguments)
                continue
            if isinstance(event, ReasoningDelta) and event.text:
                if thought is None:
                    for chunk in open_reasoning():
                        yield chunk
                reasoning += event.text
                yield frame("response.reasoning_summary_text.delta", item_id=thought["id"], output_index=len(output), summary_index=0, delta=event.text)  # type: ignore[index]
            elif isinstance(event, TextDelta) and event.text:
                if message is None:
                    for chunk in open_message():
                        yield chunk
                text += event.text
                yield frame("response.output_text.delta", item_id=message["id"], output_index=len(output), content_index=0, delta=event.text, logprobs=[])  # type: ignore[index]
            elif isinstance(event, ToolCallsEvent):
                if message is not None:
                    for chunk in close_message():
                        yield chunk
                for call in event.calls:
                    if call.id in streamed:
                        continue
                    index = len(output)
                    started = call_item(call, "in_progress", "")
                    yield frame("response.output_item.added", output_index=index, item=started)
                    yield frame("response.function_call_arguments.delta", item_id=started["id"], output_index=index, delta=call.arguments)
                    yield frame("response.function_call_arguments.done", item_id=started["id"], output_index=index, arguments=call.arguments)
                    done = call_item(call)
                    yield frame("response.output_item.done", output_index=index, item=done)
                    output.append(done)
            elif isinstance(event, Finished):
                if message is None and not any(item["type"] != "reasoning" for item in output):  # an empty answer is still one (empty) message
                    for chunk in open_message():
                        yield chunk
                if message is not None:
                    for chunk in close_message():
                        yield chunk
                final = shell.json("completed", output, event)
                yield frame("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
    except Exception as exc:  # the status line is out: the failure travels as response.failed
        error = from_exception(exc)
        failed = {**shell.json("failed", output), "error": {"code": error.code or "server_error", "message": error.message}}
        yield frame("response.failed", response=failed)


def response_json(shell: ResponseShell, text: str, calls: list[ToolCall], finished: Finished, reasoning: str = "") -> dict[str, Any]:
    return shell.json("completed", output_items(text, calls, reasoning), finished)
