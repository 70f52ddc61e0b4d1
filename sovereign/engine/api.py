"""The engine's interface as the server sees it: the real Engine and the tests' fake both provide it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sovereign.engine.requests import ChatRequest, CompletionRequest, Event
from sovereign.engine.stats import RequestStats


class Generation:
    """One submitted request: iterate it for events; `cancel()` stops it and frees its model."""

    def __init__(
        self,
        model: str,
        events: AsyncGenerator[Event, None],
        stop: Callable[[], None],
        prompt_tokens: int = 0,
        stats: RequestStats | None = None,
    ) -> None:
        self.model = model  # the store name of the model serving it (aliases resolved)
        self.prompt_tokens = prompt_tokens
        self.stats = stats  # its timings as the engine measures them (None from a test double)
        self._events = events
        self._stop = stop

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events

    def stop(self) -> None:
        """Stop generating at the next decode step; whoever iterates the events sees them end."""
        self._stop()

    async def cancel(self) -> None:
        """Stop generating (also safe after the stream has ended, or before it was read)."""
        self._stop()
        try:
            await self._events.aclose()
        except RuntimeError:
            pass  # still being iterated by a task that is itself being cancelled: the token stream is stopped anyway


@dataclass(frozen=True)
class ModelInfo:
    """A pulled model as /v1/models shows it."""

    name: str
    pulled_at: str | None
    size: int
    architecture: str | None
    quantization: str | None
    parameters: int | None
    context_length: int | None  # the loaded context when loaded, else the trained one
    loaded: bool


@dataclass(frozen=True)
class ModelLoad:
    """How busy a loaded model is, for /metrics."""

    name: str
    slots: int
    busy_slots: int
    queued: int
    decode_rate: float
    cache: dict[str, int] = field(default_factory=dict)  # the prompt cache's counts and bytes by tier


class EngineAPI(Protocol):
    """Everything the HTTP server may ask of the models."""

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation: ...

    async def count_tokens(self, request: ChatRequest) -> int: ...

    async def embed(self, model_name: str, inputs: list[str | list[int]]) -> tuple[str, list[list[float]], int]: ...

    async def tokenize(self, model_name: str, text: str, *, special: bool, add_bos: bool = False) -> list[int]: ...

    async def token_texts(self, model_name: str, tokens: list[int]) -> list[str]: ...

    async def apply_template(
        self,
        model_name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        kwargs: dict[str, Any] | None,
        add_generation_prompt: bool,
    ) -> str: ...

    async def detokenize(self, model_name: str, tokens: list[int], *, special: bool = False) -> str: ...

    def models(self) -> list[ModelInfo]: ...

    def model(self, name: str) -> ModelInfo: ...

    def is_local(self, name: str) -> bool:
        """Whether a name is a pulled model (or a catalog alias of one) itself, aliases and fallbacks aside."""
        ...

    def loads(self) -> list[ModelLoad]: ...

    def missing_files(self, name: str) -> str | None:
        """Why a store name can no longer load (removed, or its file gone or changed), or None while it can."""
        ...

    @property
    def loaded_names(self) -> list[str]: ...

    @property
    def loading_names(self) -> list[str]: ...

    async def workers(self) -> list[dict[str, str]]:
        """Each RPC worker (`serve --rpc`) and its state, for /health; [] without workers."""
        ...

    async def preload(self, name: str) -> None: ...

    async def close(self) -> None: ...
