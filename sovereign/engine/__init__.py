"""Inference as the server sees it: the request/event interface (`Engine`) over models held in a `ModelPool`.

Each model runs in a process of its own; what runs there is in `engine/runtime/`, the only code
that loads llama.cpp. The request and event types load with this package; the engine and the pool
load on first use, so that a model's process, which imports the shared modules (`wire`,
`requests`), does not also import the server's side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sovereign.engine.requests import (
    ChatRequest,
    CompletionRequest,
    Event,
    Finished,
    ReasoningControl,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolCallsEvent,
    ToolChoice,
    Usage,
)

if TYPE_CHECKING:
    from sovereign.engine.api import Generation
    from sovereign.engine.engine import Engine
    from sovereign.engine.pool import LoadedModel, ModelPool, PoolOptions

_LAZY = {
    "Engine": "sovereign.engine.engine",
    "Generation": "sovereign.engine.api",
    "LoadedModel": "sovereign.engine.pool",
    "ModelPool": "sovereign.engine.pool",
    "PoolOptions": "sovereign.engine.pool",
}


def __getattr__(name: str) -> Any:
    """The engine's heavier names, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "Engine",
    "Event",
    "Finished",
    "Generation",
    "LoadedModel",
    "ModelPool",
    "PoolOptions",
    "ReasoningControl",
    "ReasoningDelta",
    "SamplingParams",
    "TextDelta",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallsEvent",
    "ToolChoice",
    "Usage",
]
