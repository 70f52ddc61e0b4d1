"""A test double for the engine: scripted answers in-process, so wire-format tests run without a model.

It speaks the same interface the server uses (sovereign.engine.api.EngineAPI). Its answers are
a pure function of the request, so tests can state exactly what the wire must carry:
- the text is "You said: " + the last user message, one word per token;
- max_tokens cuts it (finish "length"); a stop string cuts it (finish "stop");
- a forced tool choice calls the named (or first) tool with {"echo": <last user text>};
- a last user message starting with "think" is first reasoned about: "Thinking about <text>." as reasoning;
- with tools offered and tool_choice auto, a message starting with "call" is answered with a call to the first
  tool, {"echo": <text>}, streamed as the family parsers stream it (name, then the arguments in pieces);
- a model named "crashing:model" fails mid-stream with ModelCrashed after two tokens;
- "busy:model" refuses with ServerBusy, "missing:model" does not exist.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncGenerator
from typing import Any

from sovereign.engine import (
    ChatRequest,
    CompletionRequest,
    Finished,
    Generation,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallsEvent,
    Usage,
)
from sovereign.engine.api import EngineAPI, ModelInfo, ModelLoad
from sovereign.engine.requests import Event, FinishReason
from sovereign.errors import InvalidRequest, ModelCrashed, ModelNotFound, ServerBusy

FAKE_MODELS = ("fake:model", "crashing:model", "busy:model")
CONTEXT = 4096
DIMENSIONS = 8


def _last_user_text(request: ChatRequest | CompletionRequest) -> str:
    if isinstance(request, CompletionRequest):
        return request.prompt if isinstance(request.prompt, str) else " ".join(map(str, request.prompt))
    for message in reversed(request.messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


def scripted_words(request: ChatRequest | CompletionRequest) -> list[str]:
    """The tokens the fake answers with, before any limit."""
    words = f"You said: {_last_user_text(request)}".split(" ")
    return [word if index == 0 else f" {word}" for index, word in enumerate(words)]


def scripted_reasoning(request: ChatRequest | CompletionRequest) -> list[str]:
    """The reasoning the fake writes before answering a message that starts with "think"."""
    words = f"Thinking about {_last_user_text(request)}.".split(" ")
    return [word if index == 0 else f" {word}" for index, word in enumerate(words)]


def prompt_tokens(request: ChatRequest | CompletionRequest) -> int:
    """The fake's token count for a prompt: one per word of every message."""
    if isinstance(request, CompletionRequest):
        return len(_last_user_text(request).split()) + 1
    return sum(len(str(m.get("content") or "").split()) + 1 for m in request.messages) + 1


class FakeEngine(EngineAPI):
    """Scripted generations, real event shapes; records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[ChatRequest | CompletionRequest] = []
        self.loaded: set[str] = set()

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        self._check(request.model)
        if request.model == "busy:model":
            raise ServerBusy(3, 2)
        self.requests.append(request)
        self.loaded.add(request.model)
        stopped = asyncio.Event()
        return Generation(request.model, self._events(request, stopped), stopped.set, prompt_tokens(request))

    async def _events(
        self, request: ChatRequest | CompletionRequest, stopped: asyncio.Event
    ) -> AsyncGenerator[Event, None]:
        sampling = request.sampling
        usage_prompt = prompt_tokens(request)
        if isinstance(request, ChatRequest) and request.tools and request.tool_choice.mode in ("required", "function"):
            name = request.tool_choice.function or request.tools[0]["function"]["name"]
            arguments = json.dumps({"echo": _last_user_text(request)})
            yield ToolCallsEvent([ToolCall(f"call_{zlib.crc32(arguments.encode()):08x}", name, arguments)])
            yield Finished("tool_calls", Usage(usage_prompt, 5))
            return
        if _last_user_text(request).startswith("think"):
            for word in scripted_reasoning(request):
                yield ReasoningDelta(word)
        if (
            isinstance(request, ChatRequest)
            and request.tools
            and request.tool_choice.mode == "auto"
            and _last_user_text(request).startswith("call")
        ):
            name, arguments = request.tools[0]["function"]["name"], json.dumps({"echo": _last_user_text(request)})
            call_id = f"call_{zlib.crc32(arguments.encode()):08x}"
            yield ToolCallDelta(0, call_id, name)
            for start in range(0, len(arguments), 5):
                yield ToolCallDelta(0, arguments=arguments[start : start + 5])
            yield ToolCallsEvent([ToolCall(call_id, name, arguments)])
            yield Finished("tool_calls", Usage(usage_prompt, 6))
            return
        words = scripted_words(request)
        reason: FinishReason = "stop"
        stop_hit: str | None = None
        text = ""
        produced = 0
        for word in words:
            if stopped.is_set():
                return
            if sampling.max_tokens is not None and produced >= sampling.max_tokens:
                reason = "length"
                break
            if request.model == "crashing:model" and produced == 2:
                raise ModelCrashed(request.model, "SIGSEGV")
            hit = next((s for s in sampling.stop if s and s in text + word), None)
            if hit is not None:
                yield TextDelta((text + word)[: (text + word).index(hit)][len(text) :])
                reason, stop_hit = "stop", hit
                produced += 1
                break
            text += word
            produced += 1
            yield TextDelta(word)
            await asyncio.sleep(0)
        yield Finished(reason, Usage(usage_prompt, produced), stop_hit)

    async def count_tokens(self, request: ChatRequest) -> int:
        self._check(request.model)
        return prompt_tokens(request)

    async def embed(self, model_name: str, inputs: list[str | list[int]]) -> tuple[str, list[list[float]], int]:
        self._check(model_name)
        vectors = []
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            if not text:
                raise InvalidRequest(f"input[{index}] is empty", "input")
            seed = zlib.crc32(text.encode())
            raw = [((seed >> shift) & 0xFF) + 1.0 for shift in range(DIMENSIONS)]
            norm = sum(v * v for v in raw) ** 0.5
            vectors.append([v / norm for v in raw])
        return model_name, vectors, sum(len(str(i).split()) for i in inputs)

    async def tokenize(self, model_name: str, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        self._check(model_name)
        return ([1] if add_bos else []) + list(text.encode())

    async def apply_template(
        self,
        model_name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        kwargs: dict[str, Any] | None,
        add_generation_prompt: bool,
    ) -> str:
        self._check(model_name)
        turns = "".join(f"<{m.get('role')}>{m.get('content') or ''}\n" for m in messages)
        extras = f"<tools>{json.dumps(tools)}\n" if tools else ""
        return extras + turns + ("<assistant>" if add_generation_prompt else "")

    async def token_texts(self, model_name: str, tokens: list[int]) -> list[str]:
        self._check(model_name)
        return [bytes([t]).decode("latin-1") for t in tokens]

    async def detokenize(self, model_name: str, tokens: list[int], *, special: bool = False) -> str:
        self._check(model_name)
        bad = next((t for t in tokens if not 0 <= t < 256), None)
        if bad is not None:
            raise InvalidRequest(f"tokens has token {bad}, outside this model's vocabulary of 256", "tokens")
        return bytes(tokens).decode("utf-8", "replace")

    def models(self) -> list[ModelInfo]:
        return [self.model(name) for name in FAKE_MODELS]

    def model(self, name: str) -> ModelInfo:
        self._check(name)
        return ModelInfo(name, "2026-01-01T00:00:00+00:00", 1234, "fake", "F32", 1000, CONTEXT, name in self.loaded)

    def is_local(self, name: str) -> bool:
        return name in FAKE_MODELS

    def loads(self) -> list[ModelLoad]:
        return [ModelLoad(name, 4, 0, 0, 0.0) for name in sorted(self.loaded)]

    def missing_files(self, name: str) -> str | None:
        return None if name in FAKE_MODELS else "removed from the store"

    @property
    def loaded_names(self) -> list[str]:
        return sorted(self.loaded)

    @property
    def loading_names(self) -> list[str]:
        return []

    async def workers(self) -> list[dict[str, str]]:
        return []

    async def preload(self, name: str) -> None:
        self._check(name)
        self.loaded.add(name)

    async def close(self) -> None:
        self.loaded.clear()

    @staticmethod
    def _check(name: str) -> None:
        if name not in FAKE_MODELS:
            raise ModelNotFound(
                f"the model {name!r} does not exist or is not pulled", f"pull it first: sovereign pull {name}"
            )


def as_dict(value: Any) -> Any:
    """A pydantic model from an SDK as plain data (for comparing shapes)."""
    return value.model_dump() if hasattr(value, "model_dump") else value
