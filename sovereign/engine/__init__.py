"""Inference: the request/event interface (`Engine`) over llama.cpp models held in a `ModelPool`."""

from sovereign.engine.engine import Engine, Generation
from sovereign.engine.pool import LoadedModel, ModelPool, PoolOptions
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
