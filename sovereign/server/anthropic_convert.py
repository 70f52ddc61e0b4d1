"""Between Anthropic's Messages JSON and the engine: bodies to chat requests, events to messages and SSE events."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sovereign.engine import (
    ChatRequest,
    Finished,
    ReasoningControl,
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
from sovereign.server.anthropic_schemas import (
    CountTokensBody,
    DocumentBlock,
    ImageBlock,
    MessagesBody,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    _Conversation,
)
from sovereign.server.errors import APIError
from sovereign.server.running import with_heartbeat
from sovereign.server.sse import named_event as sse
from sovereign.server.streamed_calls import StreamedCalls

# Seconds without an event before a `ping` goes out: Anthropic pings during long waits, and clients with an idle
# timeout (Claude Code among them) would otherwise hang up while a long prompt is read.
PING_SECONDS = 5.0
# The per-session billing line Claude Code puts first in its system prompt (see _instructions).
BILLING_HEADER = "x-anthropic-billing-header:"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def chat_request_from(body: MessagesBody | CountTokensBody) -> ChatRequest:
    """The engine request for a Messages body (count_tokens bodies get default sampling)."""
    messages = _messages(body)
    tools = _tools(body)
    choice = _tool_choice(body, bool(tools))
    json_schema = _output_schema(body)
    sampling = SamplingParams()
    if isinstance(body, MessagesBody):
        sampling = SamplingParams(
            max_tokens=body.max_tokens,
            temperature=sampling.temperature if body.temperature is None else body.temperature,
            top_p=sampling.top_p if body.top_p is None else body.top_p,
            top_k=sampling.top_k if body.top_k is None else body.top_k,
            stop=tuple(s for s in body.stop_sequences or () if s),
            ignore_eos=body.ignore_eos,
        )
    single = body.tool_choice is not None and bool(body.tool_choice.disable_parallel_tool_use)
    return ChatRequest(
        body.model,
        messages,
        sampling,
        tools,
        choice,
        json_schema,
        format_param="output_config.format",
        reasoning=_reasoning(body),
        parallel_tool_calls=not single,
    )


def _instructions(system: str | list[TextBlock] | None) -> str:
    """The system prompt's text, less Claude Code's billing line.

    Claude Code opens its system prompt with `x-anthropic-billing-header: cc_version=…;` whose last
    characters change with every session. It is metadata for Anthropic's billing, not an instruction.
    Kept, it would sit before the ~20k tokens that sessions share and make each new session's prompt
    differ from its first tokens on, so no cached prefix could serve it.
    """
    if not system:
        return ""
    texts = [system] if isinstance(system, str) else [block.text for block in system]
    kept = [text for text in texts if not text.startswith(BILLING_HEADER)]
    return "\n".join(kept)


def _reasoning(body: _Conversation) -> ReasoningControl:
    """Anthropic's thinking setting: enabled (with its budget) or disabled; adaptive leaves the model to decide."""
    if body.thinking is None or body.thinking.type == "adaptive":
        return ReasoningControl()
    if body.thinking.type == "disabled":
        return ReasoningControl(enabled=False)
    return ReasoningControl(enabled=True, budget_tokens=body.thinking.budget_tokens)


def _messages(body: _Conversation) -> list[dict[str, Any]]:
    """Anthropic's system + messages as the engine's OpenAI-shaped messages."""
    out: list[dict[str, Any]] = []
    system = _instructions(body.system)
    if system:
        out.append({"role": "system", "content": system})
    for index, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part_index, block in enumerate(message.content):
            where = f"messages.{index}.content.{part_index}"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ImageBlock | DocumentBlock):
                raise APIError(
                    400, f"{where}: this model reads text only; {block.type} blocks are not supported.", param=where
                )
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise APIError(400, f"{where}: tool_use blocks belong to assistant messages.", param=where)
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": json.dumps(block.input)},
                    }
                )
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise APIError(400, f"{where}: tool_result blocks belong to user messages.", param=where)
                result = _tool_result_text(block, where)
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": f"Error: {result}" if block.is_error else result,
                    }
                )
            elif isinstance(block, ThinkingBlock):
                thinking = (block.model_extra or {}).get("thinking")
                if message.role == "assistant" and isinstance(thinking, str) and thinking:
                    thoughts.append(thinking)
        if texts or calls or thoughts:
            item: dict[str, Any] = {"role": message.role, "content": "\n".join(texts)}
            if calls:
                item["tool_calls"] = calls
            if thoughts:  # handed to the template as OpenAI-compatible servers do: it decides whether history keeps it
                item["reasoning_content"] = "\n".join(thoughts)
            out.append(item)
    return out


def _tool_result_text(block: ToolResultBlock, where: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    texts = []
    for part in block.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: tool results may hold text only; got {part.get('type')!r}.", param=where)
        texts.append(part["text"])
    return "\n".join(texts)


def _tools(body: _Conversation) -> list[dict[str, Any]]:
    tools = []
    for index, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise APIError(
                400,
                f"tools.{index}: server tool {tool.type!r} is not available here; define it as a custom tool.",
                param=f"tools.{index}.type",
            )
        tools.append(function_tool(tool.name, tool.description, tool.input_schema))
    return tools


def _tool_choice(body: _Conversation, has_tools: bool) -> ToolChoice:
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if has_tools else "none")
    if choice.type == "none":
        return ToolChoice("none")
    if not has_tools:
        raise APIError(400, f"tool_choice {choice.type!r} needs tools.", param="tool_choice")
    if choice.type == "tool":
        return ToolChoice("function", choice.name)  # the engine refuses a name that is not among the tools
    return ToolChoice("required" if choice.type == "any" else "auto")


def _output_schema(body: _Conversation) -> dict[str, Any] | None:
    output_format = (body.output_config or {}).get("format")
    if output_format is None:
        return None
    if (
        not isinstance(output_format, dict)
        or output_format.get("type") != "json_schema"
        or not isinstance(output_format.get("schema"), dict)
    ):
        raise APIError(
            400, 'output_config.format must be {"type": "json_schema", "schema": {...}}.', param="output_config.format"
        )
    return output_format["schema"]


# --- responses --------------------------------------------------------------------------


def stop_reason(finished: Finished, user_stops: list[str] | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for how a generation ended."""
    if finished.reason == "tool_calls":
        return "tool_use", None
    if finished.reason == "length":
        return "max_tokens", None
    if finished.stop_sequence is not None and finished.stop_sequence in (user_stops or []):
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None  # the model's own end of turn (or a stop string of the model's template)


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def tool_use_id(call_id: str) -> str:
    """Anthropic's spelling of a call id."""
    return "toolu_" + call_id.removeprefix("call_")


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = {}
    return {
        "type": "tool_use",
        "id": tool_use_id(call.id),
        "name": call.name,
        "input": arguments if isinstance(arguments, dict) else {},
    }


def thinking_block(text: str) -> dict[str, Any]:
    """The model's reasoning as Anthropic's thinking block (local models sign nothing: the signature is empty)."""
    return {"type": "thinking", "thinking": text, "signature": ""}


def message_json(
    message_id: str,
    model: str,
    text: str,
    calls: list[ToolCall],
    finished: Finished,
    user_stops: list[str] | None,
    reasoning: str = "",
) -> dict[str, Any]:
    """A whole Message: thinking first, then the text, then the tool calls, as Anthropic orders them."""
    content: list[dict[str, Any]] = [thinking_block(reasoning)] if reasoning else []
    content += [{"type": "text", "text": text}] if text or not (calls or reasoning) else []  # as the stream sends it
    content += [tool_use_block(call) for call in calls]
    reason, sequence = stop_reason(finished, user_stops)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_json(finished.usage),
    }


async def stream_events(
    message_id: str,
    model: str,
    prompt_tokens: int,
    events: AsyncIterator[Event],
    user_stops: list[str] | None,
    *,
    context_management: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """Anthropic's event sequence for one streamed Message.

    message_start, then blocks (start, a ping after the first, deltas, stop), then message_delta and message_stop.
    """
    yield message_start(message_id, model, prompt_tokens)
    stream = MessageStream(user_stops, context_management)
    async for event in with_heartbeat(events, PING_SECONDS):
        for frame in stream.on_event(event):
            yield frame


def message_start(message_id: str, model: str, prompt_tokens: int) -> bytes:
    """The stream's first event: the Message with no content yet."""
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    return sse({"type": "message_start", "message": message})


@dataclass
class MessageStream:
    """One streamed Message: the blocks started so far, the one open, and the calls already streamed."""

    user_stops: list[str] | None
    context_management: dict[str, Any] | None = None  # the context edits applied to this request's messages
    blocks: int = 0  # blocks started so far; the open one, if any, is the last
    open_kind: str | None = None  # "thinking", "text" or "tool" while such a block is open
    open_call: int | None = None  # the engine's index of the call whose tool_use block is open
    streamed: StreamedCalls = field(default_factory=StreamedCalls)  # calls already streamed as blocks

    def on_event(self, event: Event | None) -> list[bytes]:
        """The frames for one engine event, or a ping for None (a heartbeat)."""
        if event is None:  # nothing for a while (the prompt is still being read): tell the client the stream is alive
            return [sse({"type": "ping"})]
        if isinstance(event, ReasoningDelta) and event.text:
            return self.emit_delta("thinking", {"type": "thinking_delta", "thinking": event.text})
        if isinstance(event, TextDelta) and event.text:
            return self.emit_delta("text", {"type": "text_delta", "text": event.text})
        if isinstance(event, ToolCallDelta):
            return self.emit_call_delta(event)
        if isinstance(event, ToolCallsEvent):
            return self.emit_whole_calls(event.calls)
        if isinstance(event, Finished):
            return self.finish(event)
        return []

    def delta(self, delta: dict[str, Any]) -> bytes:
        """A delta of the last block started."""
        return sse({"type": "content_block_delta", "index": self.blocks, "delta": delta})

    def open_block(self, block: dict[str, Any]) -> list[bytes]:
        """Start a block at the next index (the first is followed by a ping, as Anthropic sends it)."""
        frames = [sse({"type": "content_block_start", "index": self.blocks, "content_block": block})]
        return frames + [sse({"type": "ping"})] if self.blocks == 0 else frames

    def close_block(self) -> list[bytes]:
        """Stop the open block, if any."""
        if self.open_kind is None:
            return []
        frame = sse({"type": "content_block_stop", "index": self.blocks})
        self.blocks, self.open_kind, self.open_call = self.blocks + 1, None, None
        return [frame]

    def switch_to(self, kind: str) -> list[bytes]:
        """Close the open block unless it is of this kind, then open one of this kind."""
        if self.open_kind == kind:
            return []
        block = thinking_block("") if kind == "thinking" else {"type": "text", "text": ""}
        frames = self.close_block() + self.open_block(block)
        self.open_kind = kind
        return frames

    def emit_delta(self, kind: str, delta: dict[str, Any]) -> list[bytes]:
        """A piece of thinking or text, in a block of its kind."""
        return self.switch_to(kind) + [self.delta(delta)]

    def emit_call_delta(self, event: ToolCallDelta) -> list[bytes]:
        """A call's start (its own tool_use block) or a piece of its input, streamed as the model writes it."""
        if event.id is not None:
            return self.open_tool_use(event.index, event.id, event.name)
        if self.open_call == event.index and event.arguments:
            return [self.delta({"type": "input_json_delta", "partial_json": event.arguments})]
        return []

    def open_tool_use(self, index: int, call_id: str, name: str | None) -> list[bytes]:
        """Close the open block and start a tool_use block for a call being streamed."""
        frames = self.close_block()
        self.streamed.mark(call_id)
        frames += self.open_block({"type": "tool_use", "id": tool_use_id(call_id), "name": name, "input": {}})
        self.open_kind, self.open_call = "tool", index
        return frames

    def emit_whole_calls(self, calls: list[ToolCall]) -> list[bytes]:
        """The calls not streamed already, each a whole block: start, its input in one delta, stop."""
        frames = self.close_block()
        for call in self.streamed.unstreamed(calls):
            frames += self.emit_whole_call(call)
        return frames

    def emit_whole_call(self, call: ToolCall) -> list[bytes]:
        """One call read whole (forced calls, generic formats), as a block opened and closed at once."""
        block = tool_use_block(call)
        frames = self.open_block({**block, "input": {}})
        frames.append(self.delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])}))
        frames.append(sse({"type": "content_block_stop", "index": self.blocks}))
        self.blocks += 1
        return frames

    def finish(self, event: Finished) -> list[bytes]:
        """Close the last block, then message_delta (stop reason, usage) and message_stop."""
        frames: list[bytes] = []
        if self.open_kind is None and self.blocks == 0:  # an empty answer is still one (empty) text block
            frames += self.switch_to("text")
        frames += self.close_block()
        reason, sequence = stop_reason(event, self.user_stops)
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage_json(event.usage),
        }
        if self.context_management is not None:  # the context edits applied to this request's messages
            delta["context_management"] = self.context_management
        return frames + [sse(delta), sse({"type": "message_stop"})]
