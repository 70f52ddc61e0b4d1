"""Between OpenAI's JSON and the engine: request bodies to engine requests, events to response objects."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sovereign.engine import (
    ChatRequest,
    CompletionRequest,
    Finished,
    ReasoningControl,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallsEvent,
    ToolChoice,
    Usage,
)
from sovereign.engine.requests import Event
from sovereign.engine.stats import RequestStats
from sovereign.server.errors import APIError
from sovereign.server.schemas import ChatCompletionBody, CompletionBody, Message, NamedToolChoice, _SamplingFields

BAN = float("-inf")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sampling_from(body: _SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """Engine sampling parameters; what the body leaves out keeps the engine's defaults."""
    defaults = SamplingParams()
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    # OpenAI: -100 bans a token outright.
    bias = {int(token): (BAN if value <= -100 else value) for token, value in (body.logit_bias or {}).items()}
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        seed=body.seed,
        stop=stop,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repeat_penalty=defaults.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        logit_bias=bias,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
    )


def _message_text(message: Message, index: int) -> str | None:
    """A message's content as text; content parts must be text (this server reads no images or audio)."""
    if message.content is None or isinstance(message.content, str):
        return message.content
    texts = []
    for part_index, part in enumerate(message.content):
        where = f"messages.{index}.content.{part_index}"
        if part.get("type") != "text":
            raise APIError(
                400,
                f"Only text content parts are supported; got type {part.get('type')!r}.",
                param=where,
                code="invalid_value",
            )
        if not isinstance(part.get("text"), str):
            raise APIError(
                400,
                f"Invalid value for '{where}.text': a text part's text must be a string.",
                param=f"{where}.text",
                code="invalid_type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def reasoning_from_effort(effort: str | None) -> ReasoningControl:
    """OpenAI's reasoning_effort: "none" turns reasoning off; the others pass to templates that read it (gpt-oss)."""
    if effort is None:
        return ReasoningControl()
    if effort == "none":
        return ReasoningControl(enabled=False)
    return ReasoningControl(effort="low" if effort == "minimal" else effort)


def chat_request_from(body: ChatCompletionBody, choice_index: int = 0) -> ChatRequest:
    """The engine request for one choice of a chat completion (choice i uses seed + i)."""
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(body.messages):
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _message_text(message, index) or "",
        }
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        reasoning = (message.model_extra or {}).get("reasoning_content")
        if message.role == "assistant" and isinstance(reasoning, str) and reasoning:
            item["reasoning_content"] = reasoning  # the field reasoning templates (Qwen 3, DeepSeek) read back
        messages.append(item)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs", code="invalid_value")
    sampling = sampling_from(
        body, body.max_completion_tokens or body.max_tokens, (body.top_logprobs or 0) if body.logprobs else None
    )
    if body.seed is not None:
        sampling = replace(sampling, seed=body.seed + choice_index)
    tools = body.tools_as_sent
    choice = _tool_choice(body, bool(tools))
    json_schema = None
    json_object = False
    if body.response_format is not None:
        if body.response_format.type == "json_schema":
            if body.response_format.json_schema is None:
                raise APIError(
                    400,
                    "response_format of type json_schema needs a json_schema object.",
                    param="response_format.json_schema",
                    code="missing_required_parameter",
                )
            json_schema = body.response_format.json_schema.schema_
        json_object = body.response_format.type == "json_object"
    return ChatRequest(
        body.model,
        messages,
        sampling,
        tools,
        choice,
        json_schema,
        json_object,
        reasoning=reasoning_from_effort(body.reasoning_effort),
        template_kwargs=body.chat_template_kwargs or {},
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )


def _tool_choice(body: ChatCompletionBody, has_tools: bool) -> ToolChoice:
    if body.tool_choice is None:
        return ToolChoice("auto" if has_tools else "none")
    if not has_tools and body.tool_choice != "none":
        raise APIError(400, "tool_choice is set but no tools were given.", param="tool_choice", code="invalid_value")
    if isinstance(body.tool_choice, NamedToolChoice):
        return ToolChoice("function", body.tool_choice.function.name)
    return ToolChoice(body.tool_choice)


def completion_requests_from(body: CompletionBody) -> list[tuple[str | list[int], CompletionRequest]]:
    """One engine request per (prompt, choice): a list of prompts gives n choices each."""
    if body.prompt == [] or body.prompt == "":
        raise APIError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
    prompts: list[str | list[int]]
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif all(isinstance(p, int) for p in body.prompt):
        prompts = [list(body.prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(body.prompt)  # type: ignore[arg-type]
        for index, prompt in enumerate(prompts):
            if not prompt:  # as the whole prompt may not be: an empty one has nothing to continue
                raise APIError(400, f"prompt.{index} must not be empty.", param=f"prompt.{index}", code="invalid_value")
    base = sampling_from(body, body.max_tokens, body.logprobs)
    requests = []
    for prompt in prompts:
        for choice_index in range(body.n):
            sampling = replace(base, seed=None if body.seed is None else body.seed + choice_index)
            requests.append((prompt, CompletionRequest(body.model, prompt, sampling)))
    return requests


# --- assembling results ---------------------------------------------------------------


@dataclass
class ChoiceResult:
    """Everything one choice produced."""

    text: str = ""
    reasoning: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    finished: Finished | None = None  # the last event itself (it also says which stop string ended the text)

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.text += event.text
            self.logprobs.extend(event.logprobs)
        elif isinstance(event, ReasoningDelta):
            self.reasoning += event.text
        elif isinstance(event, ToolCallsEvent):
            self.tool_calls.extend(event.calls)
        elif isinstance(event, Finished):
            self.finish_reason = event.reason
            self.usage = event.usage
            self.finished = event


def timings_json(stats: RequestStats) -> dict[str, Any]:
    """One generation's timings in llama-server's shape (its `timings` object), measured by the engine.

    prompt: the tokens read (those reused from the cache are cache_n) and the time to the first token;
    predicted: the tokens generated after it, and how fast.
    """
    finished = stats.finished if stats.finished is not None else time.monotonic()
    first = stats.first_token if stats.first_token is not None else finished
    predicted_ms = (finished - first) * 1000
    predicted = max(stats.generated_tokens - 1, 0)  # the first token ends the prompt's reading
    return {
        "cache_n": stats.cached_tokens,
        "prompt_n": stats.prompt_tokens - stats.cached_tokens,
        "prompt_ms": round((first - stats.submitted) * 1000, 3),
        "predicted_n": stats.generated_tokens,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_second": round(predicted / predicted_ms * 1000, 3) if predicted and predicted_ms > 0 else None,
    }


def usage_json(usages: list[Usage | None], choices_per_prompt: int) -> dict[str, Any]:
    """OpenAI's usage: each distinct prompt counted once (its n choices share it), every choice's completion."""
    prompts = [u for i, u in enumerate(usages) if u is not None and i % choices_per_prompt == 0]
    prompt_tokens = sum(u.prompt_tokens for u in prompts)
    completion_tokens = sum(u.completion_tokens for u in usages if u is not None)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in prompts)},
    }


def chat_logprobs_json(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": lp.bytes,
                "top_logprobs": [{"token": t, "logprob": p, "bytes": b} for t, b, p in lp.top],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def tool_calls_json(calls: list[ToolCall], with_index: bool = False) -> list[dict[str, Any]]:
    return [
        {
            **({"index": i} if with_index else {}),
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


def chat_completion_json(
    completion_id: str, model: str, results: list[ChoiceResult], want_logprobs: bool
) -> dict[str, Any]:
    choices = []
    for index, result in enumerate(results):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": result.text if result.text or not result.tool_calls else None,
            "refusal": None,
        }
        if result.reasoning:  # llama-server's and DeepSeek's field; the OpenAI SDK keeps unknown fields
            message["reasoning_content"] = result.reasoning
        if result.tool_calls:
            message["tool_calls"] = tool_calls_json(result.tool_calls)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": chat_logprobs_json(result.logprobs) if want_logprobs else None,
                "finish_reason": result.finish_reason,
            }
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_json([r.usage for r in results], len(results)),
        "system_fingerprint": "sovereign",
    }


def chat_chunk_json(
    completion_id: str,
    model: str,
    created: int,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: list[TokenLogprob] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "sovereign",
        "choices": [
            {
                "index": index,
                "delta": delta,
                "logprobs": chat_logprobs_json(logprobs) if logprobs is not None else None,
                "finish_reason": finish_reason,
            }
        ],
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return chunk


def completion_logprobs_json(logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions logprobs shape: parallel lists."""
    offsets, position = [], offset
    for lp in logprobs:
        offsets.append(position)
        position += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t: p for t, _b, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
