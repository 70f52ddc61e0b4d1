"""The engine's one interface: submit a request, consume its events, cancel.

The server knows only this module. Below it, a pool of loaded models and one continuous-
batching scheduler per model produce tokens; here they become text (UTF-8 safe, stop
strings cut) and parsed tool calls.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from sovereign.engine import tools as tool_calls
from sovereign.engine.chat_template import Segment
from sovereign.engine.pool import LoadedModel, ModelPool
from sovereign.engine.requests import (
    ChatRequest,
    CompletionRequest,
    Event,
    Finished,
    FinishReason,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCallsEvent,
    Usage,
)
from sovereign.engine.stats import RequestStats, request_stats
from sovereign.engine.stream import TokenStream
from sovereign.errors import InvalidRequest

Request = ChatRequest | CompletionRequest


class Generation:
    """One submitted request: iterate it for events; `cancel()` stops it and frees its model."""

    def __init__(self, model: str, events: AsyncGenerator[Event, None], tokens: TokenStream, prompt_tokens: int = 0) -> None:
        self.model = model  # the store name of the model serving it (aliases resolved)
        self.prompt_tokens = prompt_tokens
        self._events = events
        self._tokens = tokens

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events

    def stop(self) -> None:
        """Stop generating at the next decode step; whoever iterates the events sees them end."""
        self._tokens.cancel()

    async def cancel(self) -> None:
        """Stop generating (also safe after the stream has ended, or before it was read)."""
        self._tokens.cancel()
        try:
            await self._events.aclose()
        except RuntimeError:
            pass  # still being iterated by a task that is itself being cancelled: the token stream is stopped anyway


@dataclass(frozen=True)
class _Prepared:
    """A request turned into tokens and decoding rules."""

    model: LoadedModel
    prompt: list[int]
    sampling: SamplingParams
    tool_mode: str  # none | auto | forced
    tools: list[dict[str, Any]]


class Engine:
    """Turns requests into event streams over the models in a pool."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    async def submit(self, request: Request) -> Generation:
        """Queue a request and return its event stream; a bad request raises here, before any event."""
        prepared = await self._prepare(request)
        stats = RequestStats(prepared.model.name, len(prepared.prompt))
        stream = prepared.model.scheduler.stream(prepared.prompt, prepared.sampling, stats)
        observed = request_stats.get()
        if observed is not None:
            observed.append(stats)
        return Generation(prepared.model.name, self._events(prepared, stream), stream, len(prepared.prompt))

    async def count_tokens(self, request: ChatRequest) -> int:
        """The prompt tokens a chat request reads (template, tools and all), without generating."""
        return len((await self._prepare(request)).prompt)

    async def embed(self, model_name: str, texts: list[str]) -> tuple[list[list[float]], int]:
        """Normalised embeddings for each text, and the total tokens read."""
        model = await self.pool.get(model_name)
        vectors: list[list[float]] = []
        total = 0
        for text in texts:
            vector, count = await model.scheduler.call(model.backend.embed, text)
            vectors.append(vector)
            total += count
        return vectors, total

    # --- preparation --------------------------------------------------------------

    async def _prepare(self, request: Request) -> _Prepared:
        model = await self.pool.get(request.model)
        with model.scheduler.hold():
            if isinstance(request, CompletionRequest):
                prompt = await asyncio.to_thread(self._completion_prompt, model, request.prompt)
                return _Prepared(model, prompt, self._with_stops(model, request.sampling), "none", [])
            return await asyncio.to_thread(self._prepare_chat, model, request)

    def _completion_prompt(self, model: LoadedModel, prompt: str | list[int]) -> list[int]:
        backend = model.backend
        if isinstance(prompt, list):
            bad = next((t for t in prompt if not 0 <= t < backend.n_vocab), None)
            if bad is not None:
                raise InvalidRequest(f"prompt token {bad} is outside this model's vocabulary of {backend.n_vocab}", "prompt")
            tokens = list(prompt)
        else:
            # A raw completion prompt is the caller's own text, control tokens included (as llama-server does).
            tokens = backend.tokenize(prompt, special=True)
        tokens = backend.with_bos(tokens)
        backend.check_fits(len(tokens))
        return tokens

    def _prepare_chat(self, model: LoadedModel, request: ChatRequest) -> _Prepared:
        template = model.template
        active_tools = request.tools if request.tool_choice.mode != "none" else []
        messages = tool_calls.as_template_messages(request.messages, active_tools, native=template.supports_tools)
        segments = template.render(messages, tools=active_tools if template.supports_tools else None)
        prompt = model.backend.with_bos(self._tokenize_segments(model, segments))
        model.backend.check_fits(len(prompt))
        sampling = self._with_stops(model, request.sampling)
        tool_mode = "none"
        if request.json_schema is not None:
            sampling = replace(sampling, grammar=_grammar_for_schema(request.json_schema, "response_format"))
        elif request.json_object:
            sampling = replace(sampling, grammar=_grammar_for_schema({"type": "object"}, "response_format"))
        if active_tools:
            if request.tool_choice.mode in ("required", "function"):
                schema = tool_calls.forced_call_schema(active_tools, request.tool_choice)
                sampling = replace(sampling, grammar=_grammar_for_schema(schema, "tool_choice"))
                tool_mode = "forced"
            else:
                tool_mode = "auto"
        return _Prepared(model, prompt, sampling, tool_mode, active_tools)

    @staticmethod
    def _tokenize_segments(model: LoadedModel, segments: list[Segment]) -> list[int]:
        """Template text may hold control tokens; message contents are plain text, always."""
        tokens: list[int] = []
        for segment in segments:
            tokens.extend(model.backend.tokenize(segment.text, special=segment.trusted))
        return tokens

    @staticmethod
    def _with_stops(model: LoadedModel, sampling: SamplingParams) -> SamplingParams:
        extra = tuple(s for s in model.stops if s not in sampling.stop)
        return replace(sampling, stop=sampling.stop + extra) if extra and not sampling.ignore_eos else sampling

    # --- running ------------------------------------------------------------------

    async def _events(self, prepared: _Prepared, stream: TokenStream) -> AsyncGenerator[Event, None]:
        text = _TextAssembler(prepared.sampling.stop)
        buffered = _ToolBuffer(prepared.tool_mode)
        completion_tokens = 0
        reason: FinishReason = "length"
        stopped: str | None = None
        try:
            async for step in stream:
                if step.end_of_generation:
                    reason = "stop"
                    break
                completion_tokens += 1
                piece, stopped = text.feed(step.piece)
                delta = buffered.feed(piece, step.logprob)
                if delta is not None:
                    yield delta
                if stopped:
                    reason = "stop"
                    break
            tail = buffered.feed(text.flush(), None)
            if tail is not None:
                yield tail
            calls = tool_calls.parse_calls(buffered.held_text, prepared.tools) if buffered.held_text else []
            if calls:
                yield ToolCallsEvent(calls)
                reason = "tool_calls"
            elif buffered.held_text:
                yield TextDelta(buffered.held_text, buffered.held_logprobs)
            if not stream.cancelled:  # a client that hung up has no finish reason
                stream.stats.finish_reason = reason
            yield Finished(reason, Usage(len(prepared.prompt), completion_tokens, stream.stats.cached_tokens), stopped if reason == "stop" else None)
        finally:
            stream.cancel()


def _grammar_for_schema(schema: dict[str, Any], param: str) -> str:
    """GBNF that admits exactly the JSON documents a schema allows."""
    from sovereign.engine.json_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema)
    except Exception as exc:  # the converter raises bare Exceptions and asserts on schemas it cannot handle
        raise InvalidRequest(f"the JSON schema cannot be enforced: {exc or type(exc).__name__}", param) from None


class _TextAssembler:
    """Bytes to text without splitting UTF-8 characters; holds back text that may begin a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, piece: bytes) -> tuple[str, str | None]:
        """Text safe to emit now, and the stop string reached if one was (the stop itself is dropped)."""
        self._pending += self._decoder.decode(piece)
        hits = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            index, stop = min(hits, key=lambda hit: hit[0])  # the earliest; among equals, the first listed
            out, self._pending = self._pending[:index], ""
            return out, stop
        hold = max((n for s in self._stops for n in range(min(len(s) - 1, len(self._pending)), 0, -1) if self._pending.endswith(s[:n])), default=0)
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        """What is left at the end (a held-back partial stop string is real text after all)."""
        rest, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return rest


class _ToolBuffer:
    """Passes text through, except text that is (or may be) a tool call, which is held for parsing."""

    def __init__(self, mode: str) -> None:
        self._mode = mode
        self._decided = mode != "auto"
        self._holding = mode == "forced"
        self.held_text = ""
        self.held_logprobs: list[TokenLogprob] = []
        self._pending_logprobs: list[TokenLogprob] = []

    def feed(self, text: str, logprob: TokenLogprob | None) -> TextDelta | None:
        """A delta to stream now, or None while text is held (or there is none)."""
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        if self._holding or not self._decided:
            self.held_text += text
            self.held_logprobs.extend(self._pending_logprobs)
            self._pending_logprobs = []
            if self._decided:
                return None
            lead = self.held_text.lstrip()
            if not lead or any(len(lead) < len(o) and o.startswith(lead) for o in tool_calls.CALL_OPENINGS):
                return None  # blank so far, or could still become "<tool_call>": wait for more
            self._decided = True
            self._holding = any(lead.startswith(o) for o in tool_calls.CALL_OPENINGS)
            if self._holding:
                return None
            text, self.held_text = self.held_text, ""
            logprobs, self.held_logprobs = self.held_logprobs, []
            return TextDelta(text, logprobs) if text else None
        if not text:
            return None
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        return TextDelta(text, logprobs)
