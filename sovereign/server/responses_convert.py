"""Between OpenAI's Responses API and the engine: bodies to chat requests, events to responses and stream events.

Stateless: every request carries the whole conversation in `input`; previous_response_id is refused.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sovereign.engine import (
    ChatRequest,
    Finished,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallsEvent,
    ToolChoice,
    Usage,
)
from sovereign.engine.requests import Event
from sovereign.engine.tools import function_tool
from sovereign.server.errors import APIError, from_exception
from sovereign.server.openai_convert import reasoning_from_effort
from sovereign.server.schemas import NamedFunction, ResponsesBody, ResponsesFunctionTool
from sovereign.server.sse import named_event as sse
from sovereign.server.streamed_calls import StreamedCalls

TEXT_PARTS = ("input_text", "output_text", "text")

log = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def chat_request_from(body: ResponsesBody) -> ChatRequest:
    """The engine request for a Responses body."""
    if body.previous_response_id or body.conversation:
        param = "previous_response_id" if body.previous_response_id else "conversation"
        raise APIError(
            400,
            (
                f"This server stores no responses or conversations, so '{param}' cannot be used: send the "
                "whole conversation in 'input'."
            ),
            param=param,
            code="unsupported_parameter",
        )
    if body.background:
        raise APIError(
            400,
            "Background responses need stored state, which this server does not keep.",
            param="background",
            code="unsupported_parameter",
        )
    plan = tool_plan(body)
    for dropped in plan.dropped:
        log.warning("responses: dropped the built-in tool %r, which a local model cannot run", dropped)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + _messages(
        body.input, plan
    )
    tools = plan.tools
    choice = _tool_choice(body, plan)
    json_schema, json_object = _text_format(body)
    defaults = SamplingParams()
    sampling = SamplingParams(
        max_tokens=body.max_output_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    effort = body.reasoning.effort if body.reasoning else None
    reasoning = reasoning_from_effort("high" if effort in ("xhigh", "max") else effort)
    return ChatRequest(
        body.model,
        messages,
        sampling,
        tools,
        choice,
        json_schema,
        json_object,
        format_param="text.format",
        reasoning=reasoning,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )


def _messages(items: str | list[dict[str, Any]], plan: ToolPlan | None = None) -> list[dict[str, Any]]:
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
                raise APIError(
                    400,
                    f"{where}.role must be user, assistant, system or developer.",
                    param=f"{where}.role",
                    code="invalid_value",
                )
            out.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _text(item.get("content"), f"{where}.content"),
                }
            )
        elif kind == "function_call":
            name = str(item.get("name", ""))
            if item.get("namespace"):  # a namespaced call, as Codex hands it back: the name the model was offered
                name = (plan or ToolPlan()).flat_name(str(item["namespace"]), name)
            call = {
                "id": str(item.get("call_id", "")),
                "type": "function",
                "function": {"name": name, "arguments": str(item.get("arguments", "{}"))},
            }
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": str(item.get("call_id", "")),
                    "content": _text(item.get("output"), f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # a reasoning model's notes, handed back by clients: nothing here reads them
        elif kind == "item_reference":
            raise APIError(
                400,
                f"{where}: item references need stored responses, which this server does not keep.",
                param=where,
                code="unsupported_parameter",
            )
        else:
            raise APIError(
                400,
                f"{where}: input items of type {kind!r} are not supported.",
                param=f"{where}.type",
                code="invalid_value",
            )
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
            raise APIError(
                400,
                f"{where}.{index}: this model reads text only; got a part of type {kind!r}.",
                param=f"{where}.{index}",
                code="invalid_value",
            )
        texts.append(part["text"])
    return "\n".join(texts)


# Tool types that are functions in all but name are handled; every other type is a tool OpenAI runs itself
# (web_search, file_search, code_interpreter, image_generation, computer_use, remote mcp) or one with its own
# call item (custom, local_shell, shell, apply_patch, tool_search): a local model can run none of them.


@dataclass
class ToolPlan:
    """What a request's tools become: the engine's function tools, the built-ins dropped, and namespaced names."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # built-in tools left out, as "type" or "type:name"
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)  # offered name -> (namespace, name)
    offered: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, name) -> offered name

    def flat_name(self, namespace: str, name: str) -> str:
        """The name a namespaced function is offered under: <namespace>__<name> (or joined as is when the namespace
        ends in "_", as Codex's "mcp__server__" ones do), shortened with a checksum to fit 64 characters."""
        known = self.offered.get((namespace, name))
        if known is not None:
            return known
        flat = namespace + name if namespace.endswith("_") else f"{namespace}__{name}"
        flat = re.sub(r"[^A-Za-z0-9_.-]", "_", flat)
        if len(flat) > 64:
            flat = f"{flat[:55]}_{zlib.crc32(flat.encode()):08x}"
        return flat

    def split(self, offered: str) -> tuple[str | None, str]:
        """(namespace, name) of a called function: what the client defined, for the function_call item."""
        return self.namespaced.get(offered, (None, offered))


def tool_plan(body: ResponsesBody) -> ToolPlan:
    plan = ToolPlan()
    names: set[str] = set()

    def add(tool: ResponsesFunctionTool, where: str, namespace: tuple[str, str | None] | None = None) -> None:
        name, description = tool.name, tool.description
        if namespace is not None:
            name = plan.flat_name(namespace[0], tool.name)
            plan.namespaced[name] = (namespace[0], tool.name)
            plan.offered[(namespace[0], tool.name)] = name
            if namespace[1]:  # the group's description is the only place some of its meaning lives
                description = f"{namespace[1]}\n\n{description}" if description else namespace[1]
        if name in names:
            raise APIError(
                400, f"{where}: the function name {name!r} is defined twice.", param=where, code="invalid_value"
            )
        names.add(name)
        plan.tools.append(function_tool(name, description, tool.parameters or {"type": "object", "properties": {}}))

    for index, raw in enumerate(body.tools or []):
        where = f"tools.{index}"
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise APIError(400, f"{where}.type must be a string.", param=f"{where}.type", code="invalid_value")
        if kind == "function":
            add(_function(raw, where), where)
        elif kind == "namespace":
            namespace, description, members = raw.get("name"), raw.get("description"), raw.get("tools")
            if not isinstance(namespace, str) or not namespace or not isinstance(members, list):
                raise APIError(
                    400,
                    f"{where}: a namespace tool needs a name and a list of tools.",
                    param=where,
                    code="invalid_value",
                )
            if description is not None and not isinstance(description, str):
                raise APIError(
                    400, f"{where}.description must be a string.", param=f"{where}.description", code="invalid_type"
                )
            for inner, member in enumerate(members):
                inner_where = f"{where}.tools.{inner}"
                if not isinstance(member, dict):
                    raise APIError(400, f"{inner_where} must be an object.", param=inner_where, code="invalid_type")
                if member.get("type") == "function":
                    add(_function(member, inner_where), inner_where, (namespace, description))
                else:
                    plan.dropped.append(_dropped_label(member, namespace))
        else:
            plan.dropped.append(_dropped_label(raw))
    return plan


def _function(raw: dict[str, Any], where: str) -> ResponsesFunctionTool:
    try:
        return ResponsesFunctionTool.model_validate(raw)
    except ValueError as exc:
        raise APIError(400, f"{where} is not a valid function tool: {exc}", param=where, code="invalid_value") from None


def _dropped_label(raw: dict[str, Any], namespace: str | None = None) -> str:
    kind, name = str(raw.get("type")), raw.get("name")
    if not isinstance(name, str):
        return kind
    return f"{kind}:{namespace}.{name}" if namespace else f"{kind}:{name}"


def _tool_choice(body: ResponsesBody, plan: ToolPlan) -> ToolChoice:
    choice, has_tools = body.tool_choice, bool(plan.tools)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        namespace = choice.get("namespace")  # a namespaced function, named as the client knows it
        choice = NamedFunction(
            type="function",
            name=plan.flat_name(namespace, choice["name"])
            if isinstance(namespace, str) and namespace
            else choice["name"],
        )
    if isinstance(choice, dict):  # a built-in tool forced: it was dropped, so obeying is impossible
        kind = choice.get("type")
        raise APIError(
            400,
            (
                f"tool_choice forces a tool of type {kind!r}, which this server does not run: only function "
                "tools are available here."
            ),
            param="tool_choice",
            code="invalid_value",
        )
    if choice is None:
        return ToolChoice("auto" if has_tools else "none")
    if choice != "none" and not has_tools:
        if plan.dropped:
            raise APIError(
                400,
                (
                    f"tool_choice is {_choice_label(choice)!r} but no function tools are left: "
                    f"{', '.join(plan.dropped)} cannot run here."
                ),
                param="tool_choice",
                code="invalid_value",
            )
        raise APIError(400, "tool_choice is set but no tools were given.", param="tool_choice", code="invalid_value")
    if isinstance(choice, NamedFunction):
        name = choice.name
        if name not in plan.namespaced and all(tool["function"]["name"] != name for tool in plan.tools):
            inner = [offered for offered, (_, member) in plan.namespaced.items() if member == name]
            name = inner[0] if len(inner) == 1 else name  # a namespaced function named by its own name
        return ToolChoice("function", name)  # the engine refuses a name that is not among the tools
    return ToolChoice(choice)


def _choice_label(choice: Any) -> str:
    return choice.name if isinstance(choice, NamedFunction) else str(choice)


def _text_format(body: ResponsesBody) -> tuple[dict[str, Any] | None, bool]:
    """(json_schema, json_object) from text.format."""
    text_format = body.text.format if body.text else None
    if text_format is None or text_format.type == "text":
        return None, False
    if text_format.type == "json_object":
        return None, True
    if text_format.schema_ is None:
        raise APIError(
            400,
            "text.format of type json_schema needs a schema.",
            param="text.format.schema",
            code="missing_required_parameter",
        )
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
    """A message item; "incomplete" (cut by max_output_tokens) still carries the text written so far."""
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(
    call: ToolCall, status: str = "completed", arguments: str | None = None, plan: ToolPlan | None = None
) -> dict[str, Any]:
    """A function_call item; a namespaced function is named as the client defined it, `name` and `namespace` apart
    (Codex routes a call by the pair, ToolName::new(namespace, name), in codex-rs/core/src/tools/router.rs)."""
    namespace, name = plan.split(call.name) if plan is not None else (None, call.name)
    item = {
        "type": "function_call",
        "id": "fc_" + call.id.removeprefix("call_"),
        "call_id": call.id,
        "name": name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }
    if namespace is not None:
        item["namespace"] = namespace
    return item


class ResponseShell:
    """The fields of a Response that echo the request; output, status and usage are filled in as they are known."""

    def __init__(self, body: ResponsesBody, model: str) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.plan = tool_plan(body)

    def json(self, status: str, output: list[dict[str, Any]], finished: Finished | None = None) -> dict[str, Any]:
        body = self.body
        text_format = (
            body.text.format.model_dump(by_alias=True, exclude_none=True)
            if body.text and body.text.format
            else {"type": "text"}
        )
        tool_choice = (
            body.tool_choice.model_dump()
            if isinstance(body.tool_choice, NamedFunction)
            else (body.tool_choice or "auto")
        )
        tools = []  # the tools as given, less those dropped
        for tool in body.tools or []:
            if tool.get("type") == "function":
                tools.append({**tool, "parameters": tool.get("parameters"), "strict": tool.get("strict")})
            elif tool.get("type") == "namespace":
                tools.append(
                    {
                        **tool,
                        "tools": [
                            t for t in tool.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"
                        ],
                    }
                )
        incomplete = finished is not None and finished.reason == "length"
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": self.model,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "tool_choice": tool_choice,
            "tools": tools,
            "text": {"format": text_format},
            "previous_response_id": None,
            "store": False,
            "truncation": "disabled",
            "metadata": body.metadata or {},
            "user": body.user,
            "usage": usage_json(finished.usage) if finished else None,
        }
        if self.plan.dropped:  # sovereign's extension: the Responses object has no field for warnings
            response["sovereign_dropped_tools"] = list(self.plan.dropped)
        return response


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    """The model's reasoning as a reasoning item: its text in full (nothing is summarised locally)."""
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [{"type": "summary_text", "text": text}] if text else [],
        "status": "completed",
    }


def output_items(
    text: str, calls: list[ToolCall], reasoning: str = "", plan: ToolPlan | None = None, cut: bool = False
) -> list[dict[str, Any]]:
    """A finished answer's output: its reasoning, the message, then the function calls.

    The message comes when there is text, or nothing else.
    cut: the answer ran into max_output_tokens, so its message is "incomplete", as OpenAI marks it."""
    items = [reasoning_item(new_id("rs"), reasoning)] if reasoning else []
    items += [message_item(new_id("msg"), text, "incomplete" if cut else "completed")] if text or not calls else []
    return items + [call_item(call, plan=plan) for call in calls]


async def stream_events(shell: ResponseShell, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """The Responses API's documented event sequence for one streamed response.

    created, in_progress, per item added/deltas/done, then completed (or incomplete, or failed).
    """
    stream = ResponseStream(shell)
    for frame in stream.start():
        yield frame
    try:
        async for event in events:
            for frame in stream.on_event(event):
                yield frame
    except Exception as exc:  # noqa: BLE001 - the status line is out: the failure travels as response.failed
        yield stream.fail(exc)


@dataclass
class ResponseStream:
    """One streamed response: its sequence numbers, the items done, and the message, reasoning or call open."""

    shell: ResponseShell
    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)  # the items done, in order
    message: dict[str, Any] | None = None  # the message item being streamed
    text: str = ""
    thought: dict[str, Any] | None = None  # the reasoning item being streamed
    reasoning: str = ""
    calling: tuple[int, ToolCall] | None = None  # the engine's index and the call being streamed (arguments so far)
    streamed: StreamedCalls = field(default_factory=StreamedCalls)  # calls already streamed as items

    def frame(self, kind: str, **fields: Any) -> bytes:
        """One event, numbered in sequence."""
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(event)

    def item_frame(self, kind: str, item_id: str, index: int, **fields: Any) -> bytes:
        """An event about the content of the item at this output index."""
        return self.frame(kind, item_id=item_id, output_index=index, **fields)

    def start(self) -> list[bytes]:
        """response.created, then response.in_progress."""
        kinds = ("response.created", "response.in_progress")
        return [self.frame(kind, response=self.shell.json("in_progress", [])) for kind in kinds]

    def on_event(self, event: Event) -> list[bytes]:
        """The frames for one engine event: first those closing what it ends, then its own."""
        frames = self.close_ended(event)
        if isinstance(event, ToolCallDelta):
            frames += self.emit_call_delta(event)
        elif isinstance(event, ReasoningDelta) and event.text:
            frames += self.emit_reasoning(event.text)
        elif isinstance(event, TextDelta) and event.text:
            frames += self.emit_text(event.text)
        elif isinstance(event, ToolCallsEvent):
            frames += self.emit_whole_calls(event.calls)
        elif isinstance(event, Finished):
            frames += self.finish(event)
        return frames

    def close_ended(self, event: Event) -> list[bytes]:
        """Close the reasoning and the call being streamed unless this event goes on with them."""
        frames: list[bytes] = []
        # Reasoning comes first and ends before the answer.
        if self.thought is not None and not isinstance(event, ReasoningDelta):
            frames += self.close_reasoning()
        if self.calling is not None and not (isinstance(event, ToolCallDelta) and event.id is None):
            frames += self.close_call()
        return frames

    def open_message(self) -> list[bytes]:
        """Add a message item, with its output_text part."""
        self.message = message_item(new_id("msg"), "", "in_progress")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index = len(self.output)
        return [
            self.frame("response.output_item.added", output_index=index, item=self.message),
            self.item_frame("response.content_part.added", self.message["id"], index, content_index=0, part=part),
        ]

    def emit_text(self, text: str) -> list[bytes]:
        """A piece of the answer, in the message item (opened by the first)."""
        frames = self.open_message() if self.message is None else []
        assert self.message is not None
        self.text += text
        item_id, index = self.message["id"], len(self.output)
        delta = self.item_frame("response.output_text.delta", item_id, index, content_index=0, delta=text, logprobs=[])
        return frames + [delta]

    def close_message(self, status: str = "completed") -> list[bytes]:
        """Finish the message item, which joins the output."""
        assert self.message is not None
        done = message_item(self.message["id"], self.text, status)
        item_id, index = done["id"], len(self.output)
        frames = [
            self.item_frame("response.output_text.done", item_id, index, content_index=0, text=self.text, logprobs=[]),
            self.item_frame("response.content_part.done", item_id, index, content_index=0, part=done["content"][0]),
            self.frame("response.output_item.done", output_index=index, item=done),
        ]
        self.output.append(done)
        self.message = None
        return frames

    def open_reasoning(self) -> list[bytes]:
        """Add a reasoning item, with its summary part."""
        self.thought = {"type": "reasoning", "id": new_id("rs"), "summary": [], "status": "in_progress"}
        part = {"type": "summary_text", "text": ""}
        item_id, index = self.thought["id"], len(self.output)
        return [
            self.frame("response.output_item.added", output_index=index, item=self.thought),
            self.item_frame("response.reasoning_summary_part.added", item_id, index, summary_index=0, part=part),
        ]

    def emit_reasoning(self, text: str) -> list[bytes]:
        """A piece of reasoning, in the reasoning item (opened by the first)."""
        frames = self.open_reasoning() if self.thought is None else []
        assert self.thought is not None
        self.reasoning += text
        item_id, index = self.thought["id"], len(self.output)
        delta = self.item_frame("response.reasoning_summary_text.delta", item_id, index, summary_index=0, delta=text)
        return frames + [delta]

    def close_reasoning(self) -> list[bytes]:
        """Finish the reasoning item, which joins the output."""
        assert self.thought is not None
        text = self.reasoning
        done = reasoning_item(self.thought["id"], text)
        part = {"type": "summary_text", "text": text}
        item_id, index = done["id"], len(self.output)
        frames = [
            self.item_frame("response.reasoning_summary_text.done", item_id, index, summary_index=0, text=text),
            self.item_frame("response.reasoning_summary_part.done", item_id, index, summary_index=0, part=part),
            self.frame("response.output_item.done", output_index=index, item=done),
        ]
        self.output.append(done)
        self.thought = None
        return frames

    def emit_call_delta(self, event: ToolCallDelta) -> list[bytes]:
        """A call's start, or a piece of the arguments of the call being streamed."""
        if event.id is not None:
            return self.open_call(event.index, event.id, event.name or "")
        if self.calling is not None and self.calling[0] == event.index and event.arguments:
            return self.emit_arguments(event.arguments)
        return []

    def open_call(self, index: int, call_id: str, name: str) -> list[bytes]:
        """A call begins: its item, then its arguments as the model writes them."""
        frames = self.close_message() if self.message is not None else []
        call = ToolCall(call_id, name, "")
        self.calling = (index, call)
        self.streamed.mark(call_id)
        item = call_item(call, "in_progress", "", self.shell.plan)
        return frames + [self.frame("response.output_item.added", output_index=len(self.output), item=item)]

    def emit_arguments(self, arguments: str) -> list[bytes]:
        """A piece of the arguments of the call being streamed."""
        assert self.calling is not None
        index, call = self.calling
        self.calling = (index, ToolCall(call.id, call.name, call.arguments + arguments))
        item_id = call_item(call)["id"]
        return [self.item_frame("response.function_call_arguments.delta", item_id, len(self.output), delta=arguments)]

    def close_call(self) -> list[bytes]:
        """Finish the call being streamed, which joins the output."""
        assert self.calling is not None
        call, index = self.calling[1], len(self.output)
        done = call_item(call, plan=self.shell.plan)
        self.calling = None
        self.output.append(done)
        return [
            self.item_frame("response.function_call_arguments.done", done["id"], index, arguments=call.arguments),
            self.frame("response.output_item.done", output_index=index, item=done),
        ]

    def emit_whole_calls(self, calls: list[ToolCall]) -> list[bytes]:
        """The calls not streamed already, each a whole item: added, its arguments in one delta, done."""
        frames = self.close_message() if self.message is not None else []
        for call in self.streamed.unstreamed(calls):
            frames += self.emit_whole_call(call)
        return frames

    def emit_whole_call(self, call: ToolCall) -> list[bytes]:
        """One call read whole (forced calls, generic formats), as a complete item."""
        started = call_item(call, "in_progress", "", self.shell.plan)
        done = call_item(call, plan=self.shell.plan)
        item_id, index = started["id"], len(self.output)
        frames = [
            self.frame("response.output_item.added", output_index=index, item=started),
            self.item_frame("response.function_call_arguments.delta", item_id, index, delta=call.arguments),
            self.item_frame("response.function_call_arguments.done", item_id, index, arguments=call.arguments),
            self.frame("response.output_item.done", output_index=index, item=done),
        ]
        self.output.append(done)
        return frames

    def finish(self, event: Finished) -> list[bytes]:
        """Close the message, then response.completed (or response.incomplete, when cut by max_output_tokens)."""
        frames: list[bytes] = []
        if self.message is None and all(item["type"] == "reasoning" for item in self.output):
            frames += self.open_message()  # an empty answer is still one (empty) message
        if self.message is not None:
            frames += self.close_message("incomplete" if event.reason == "length" else "completed")
        final = self.shell.json("completed", self.output, event)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return frames + [self.frame(kind, response=final)]

    def fail(self, exc: Exception) -> bytes:
        """response.failed, with the items done so far and the error."""
        error = from_exception(exc)
        details = {"code": error.code or "server_error", "message": error.message}
        return self.frame("response.failed", response={**self.shell.json("failed", self.output), "error": details})


def response_json(
    shell: ResponseShell, text: str, calls: list[ToolCall], finished: Finished, reasoning: str = ""
) -> dict[str, Any]:
    return shell.json(
        "completed", output_items(text, calls, reasoning, shell.plan, finished.reason == "length"), finished
    )
