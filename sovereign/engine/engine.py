"""The engine's one interface: submit a request, consume its events, cancel; tokenize, embed, list models.

The server knows only this module (through api.EngineAPI). Below it, a pool of models, each in a
process of its own running a continuous-batching scheduler, produce tokens; here they become text
(UTF-8 safe, stop strings cut) and parsed tool calls. Chat templates are rendered here, in the
server's process; tokenizing happens in the model's.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

from sovereign.engine import conversation, formats, output, rpc_workers, wire
from sovereign.engine import tools as tool_calls
from sovereign.engine.api import EngineAPI, Generation, ModelInfo, ModelLoad
from sovereign.engine.call_grammar import call_grammar
from sovereign.engine.chat_template import ChatTemplate, Segment, check_kwargs
from sovereign.engine.pool import LoadedModel, ModelPool
from sovereign.engine.requests import (
    ChatRequest,
    CompletionRequest,
    Event,
    Finished,
    FinishReason,
    SamplingParams,
    ToolCallsEvent,
    Usage,
)
from sovereign.engine.stats import RequestStats, request_stats
from sovereign.engine.stream import TokenStream
from sovereign.errors import ContextLengthExceeded, InvalidRequest, SovereignError
from sovereign.refs import parse_name
from sovereign.store.manifest import Manifest

Request = ChatRequest | CompletionRequest
# Prompts shorter than this (about 1.5k tokens) are read again quickly: no checkpoints are worth finding for them.
SPLIT_MIN_CHARS = 6000
WORKER_PROBE_SECONDS = 5.0  # /health probes idle RPC workers at most this often
_FILE_STATUS = {"missing": "its file is gone", "changed": "its file changed since it was registered"}


@dataclass(frozen=True)
class _Prepared:
    """A request turned into tokens and decoding rules."""

    model: LoadedModel
    prompt: list[int]
    sampling: SamplingParams
    tool_mode: str  # none | auto | forced
    tools: list[dict[str, Any]]
    in_reasoning: bool = False  # the prompt ends inside the reasoning block (the template opened it)
    parallel_tool_calls: bool = True
    reasoning_budget: int | None = None  # reasoning tokens before the family's end marker is written for the model
    checkpoints: tuple[int, ...] = ()  # prompt positions where another conversation would part from this one


class Engine(EngineAPI):
    """Turns requests into event streams over the models in a pool; the server's only way to a model."""

    def __init__(self, pool: ModelPool, *, reasoning_format: str = "auto") -> None:
        self.pool = pool
        self.raw_reasoning = reasoning_format == "none"  # --reasoning-format none: leave the model's text as it is
        self._worker_probe: tuple[float, list[dict[str, str]]] | None = None  # (when, states) of the last probe

    async def submit(self, request: Request) -> Generation:
        """Queue a request and return its event stream; a bad request raises here, before any event."""
        prepared = await self._prepare(request)
        stats = RequestStats(prepared.model.name, len(prepared.prompt))
        stream = await prepared.model.process.submit(prepared.prompt, prepared.sampling, stats, prepared.checkpoints)
        observed = request_stats.get()
        if observed is not None:
            observed.append(stats)
        events = self._events(prepared, stream)
        return Generation(prepared.model.name, events, stream.cancel, len(prepared.prompt), stats)

    async def count_tokens(self, request: ChatRequest) -> int:
        """The prompt tokens a chat request reads (template, tools and all), without generating."""
        return len((await self._prepare(request)).prompt)

    async def embed(self, model_name: str, inputs: list[str | list[int]]) -> tuple[str, list[list[float]], int]:
        """The serving model's name, a normalised embedding for each input (text or token ids), and the tokens read."""
        model = await self.pool.get(model_name)
        vectors: list[list[float]] = []
        total = 0
        for index, item in enumerate(inputs):
            if isinstance(item, list):  # token ids: embed the text they spell
                item = await self._text_of_own_tokens(model, item, index)
            if not item:
                raise InvalidRequest(f"input[{index}] is empty", "input")
            vector, count = await model.process.call("embed", item)
            vectors.append(vector)
            total += count
        return model.name, vectors, total

    async def _text_of_own_tokens(self, model: LoadedModel, tokens: list[int], index: int) -> str:
        """The text token ids spell, when they are this model's tokenization of it; InvalidRequest otherwise.

        LangChain's OpenAIEmbeddings tokenizes with tiktoken (cl100k) before sending: read as this model's
        ids, those numbers spell unrelated text, and the vectors would be silently wrong. This model's own
        tokens spell text that tokenizes back to them.
        """
        text = (await self._pieces(model, tokens, special=False, param=f"input[{index}]")).decode("utf-8", "replace")
        again = (await model.process.call("tokenize", [[text, False]]))[0]
        if again != tokens and model.facts.with_bos(again) != tokens:
            raise InvalidRequest(
                f"input[{index}] holds token ids that are not this model's tokens of any text "
                "(another tokenizer's, such as tiktoken's?): "
                "send the text itself (LangChain's OpenAIEmbeddings does with check_embedding_ctx_length=False)",
                "input",
            )
        return text

    async def tokenize(self, model_name: str, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        """Token ids for text; `special` lets control-token text become control tokens."""
        model = await self.pool.get(model_name)
        tokens: list[int] = (await model.process.call("tokenize", [[text, special]]))[0]
        return model.facts.with_bos(tokens) if add_bos else tokens

    async def apply_template(
        self,
        model_name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        kwargs: dict[str, Any] | None,
        add_generation_prompt: bool,
    ) -> str:
        """The prompt text the model's chat template makes of these messages, tools and template kwargs."""
        model = await self.pool.get(model_name)
        template = model.template
        messages = tool_calls.as_template_messages(
            conversation.normalize(messages), tools or [], native=template.supports_tools
        )
        active = tools if template.supports_tools else None
        check_kwargs(kwargs or {})
        render = functools.partial(
            _render_as_allowed,
            template,
            messages,
            active,
            {**(kwargs or {}), "add_generation_prompt": add_generation_prompt},
        )
        return "".join(segment.text for segment in await asyncio.to_thread(render))

    async def token_texts(self, model_name: str, tokens: list[int]) -> list[str]:
        """Each token as text, control tokens spelled out."""
        model = await self.pool.get(model_name)
        _check_vocabulary(model, tokens, "tokens")
        pieces = wire.pieces_from_wire(await model.process.call("pieces", tokens, True))
        return [piece.decode("utf-8", "replace") for piece in pieces]

    async def detokenize(self, model_name: str, tokens: list[int], *, special: bool = False) -> str:
        """The text token ids spell (control tokens included only when `special`)."""
        model = await self.pool.get(model_name)
        return (await self._pieces(model, tokens, special=special, param="tokens")).decode("utf-8", "replace")

    # --- models -------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every pulled model."""
        return [self._info(manifest) for manifest in self.pool.store.list()]

    def model(self, name: str) -> ModelInfo:
        """One pulled model by name or alias; ModelNotFound if there is none."""
        return self._info(self.pool.resolve(name))

    def is_local(self, name: str) -> bool:
        """Whether a name is a pulled model (or a catalog alias of one) itself, aliases and fallbacks aside."""
        return self.pool.pulled(name) is not None

    def loads(self) -> list[ModelLoad]:
        """How busy each loaded model is."""
        return [
            ModelLoad(
                name,
                model.process.n_slots,
                model.process.busy_slots,
                model.process.queued,
                model.process.decode_rate(),
                dict(model.process.cache_figures),
            )
            for name, model in self.pool.loaded.items()
        ]

    def missing_files(self, name: str) -> str | None:
        """Why a store name can no longer load (removed, or its file gone or changed), or None while it can."""
        store = self.pool.store
        try:
            manifest = store.get(parse_name(name))
        except SovereignError as exc:  # a damaged manifest
            return exc.message
        if manifest is None:
            return "removed from the store"
        status = store.file_status(manifest)  # stats only: cheap enough for every /health
        return None if status == "ok" else _FILE_STATUS[status]

    @property
    def loaded_names(self) -> list[str]:
        return sorted(self.pool.loaded)

    @property
    def loading_names(self) -> list[str]:
        return self.pool.loading

    async def workers(self) -> list[dict[str, str]]:
        """Each RPC worker and its state: its connection from the loaded model, else a probe (at most every few s)."""
        endpoints = list(self.pool.options.load.rpc_servers)
        if not endpoints:
            return []
        if self.pool.loading:  # the loading process holds the workers: a probe would only queue behind it
            return [{"worker": endpoint, "state": "loading"} for endpoint in endpoints]
        held = next((m.process.worker_states() for m in self.pool.loaded.values() if m.process.alive), None)
        if held is None and (cached := self._worker_probe) and time.monotonic() - cached[0] < WORKER_PROBE_SECONDS:
            return cached[1]  # a worker serves one head at a time: probes queue on it, so not one per /health
        states = await asyncio.to_thread(rpc_workers.health, endpoints, held)
        if held is None:
            self._worker_probe = (time.monotonic(), states)
        return states

    async def preload(self, name: str) -> None:
        """Load a model now and keep it loaded."""
        await self.pool.get(name, pin=True)

    async def close(self) -> None:
        """Unload every model."""
        await self.pool.close()

    def _info(self, manifest: Manifest) -> ModelInfo:
        loaded = self.pool.loaded.get(manifest.name)
        gguf = manifest.gguf
        context = loaded.facts.n_ctx if loaded else gguf.get("context_length")
        return ModelInfo(
            manifest.name,
            manifest.pulled_at,
            manifest.size,
            gguf.get("architecture"),
            gguf.get("quantization"),
            gguf.get("parameters"),
            context,
            loaded is not None,
        )

    async def _pieces(self, model: LoadedModel, tokens: list[int], *, special: bool, param: str) -> bytes:
        _check_vocabulary(model, tokens, param)
        if not tokens:
            return b""
        return b"".join(wire.pieces_from_wire(await model.process.call("pieces", tokens, special)))

    # --- preparation --------------------------------------------------------------

    async def _prepare(self, request: Request) -> _Prepared:
        model = await self.pool.get(request.model)
        with model.process.hold():
            if isinstance(request, CompletionRequest):
                prompt = await self._completion_prompt(model, request.prompt)
                return _Prepared(model, prompt, self._with_stops(model, request.sampling), "none", [])
            return await self._prepare_chat(model, request)

    async def _completion_prompt(self, model: LoadedModel, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            _check_vocabulary(model, prompt, "prompt")
            tokens = list(prompt)
        else:
            # A raw completion prompt is the caller's own text, control tokens included (as llama-server does).
            tokens = (await model.process.call("tokenize", [[prompt, True]]))[0]
        tokens = model.facts.with_bos(tokens)
        _check_fits(model, len(tokens))
        return tokens

    async def _prepare_chat(self, model: LoadedModel, request: ChatRequest) -> _Prepared:
        rendered, splits = await asyncio.to_thread(self._render_with_splits, model, request)
        segments, sampling, tool_mode, active_tools, opened = rendered
        # Template text may hold control tokens; a control token a client typed is tokenized as plain text.
        pieces = await model.process.call("tokenize", [[segment.text, segment.trusted] for segment in segments])
        prompt = model.facts.with_bos([token for piece in pieces for token in piece])
        _check_fits(model, len(prompt))
        budget = request.reasoning.budget_tokens if model.format.reasoning and not self.raw_reasoning else None
        starts = list(
            itertools.accumulate((len(piece) for piece in pieces), initial=len(prompt) - sum(map(len, pieces)))
        )
        checkpoints = tuple(starts[index] for index in splits)
        return _Prepared(
            model, prompt, sampling, tool_mode, active_tools, opened, request.parallel_tool_calls, budget, checkpoints
        )

    def _render_with_splits(
        self, model: LoadedModel, request: ChatRequest
    ) -> tuple[tuple[list[Segment], SamplingParams, str, list[dict[str, Any]], bool], list[int]]:
        """The rendering (_render_chat), cut into more segments where another conversation could part from this.

        Also the indexes of the segments that start there. Tokenized apart, the text before a cut is the
        same tokens in every conversation that shares it (a token never spans the cut).
        """
        rendered = self._render_chat(model, request)
        segments = rendered[0]
        if sum(len(segment.text) for segment in segments) < SPLIT_MIN_CHARS:
            return rendered, []
        cuts = self._conversation_splits(model, request, segments)
        pieces: list[Segment] = []
        starts: list[int] = []
        for index, segment in enumerate(segments):
            here = {offset for at, offset in cuts if at == index}
            bounds = sorted({0, len(segment.text), *here})
            for begin, end in zip(bounds, bounds[1:], strict=False):
                if begin in here:
                    starts.append(len(pieces))
                pieces.append(Segment(segment.text[begin:end], segment.trusted))
        return (pieces, rendered[1], rendered[2], rendered[3], rendered[4]), starts

    def _conversation_splits(
        self, model: LoadedModel, request: ChatRequest, segments: list[Segment]
    ) -> list[tuple[int, int]]:
        """Where the first and the last user message begin: (segment, offset in it), where another conversation parts.

        A new session of an agent shares its system prompt and tools and parts at its first message;
        an edited or regenerated turn parts at the last one. The model's process keeps a checkpoint
        there (runtime/slots.py), so that such a prompt can start from a saved state of this one.
        Found by rendering again with that message changed and seeing where the text first differs.
        """
        template = model.template
        active_tools = request.tools if request.tool_choice.mode != "none" else []
        tools = active_tools if template.supports_tools else None
        kwargs = request.all_template_kwargs()
        # The messages as the client sent them: a system note folded in front of a user turn is shared
        # context, and the cut belongs where the user's own text begins.
        users = [i for i, m in enumerate(request.messages) if m.get("role") == "user" and _marked(m) is not None]
        cuts = set()
        for index in {users[0], users[-1]} if users else set():
            changed = [dict(m) for m in request.messages]
            changed[index] = _marked(changed[index]) or changed[index]
            messages = tool_calls.as_template_messages(
                conversation.normalize(changed), active_tools, native=template.supports_tools
            )
            try:
                other = _render_as_allowed(template, messages, tools, kwargs)
            except InvalidRequest:
                continue
            for at, (a, b) in enumerate(zip(segments, other, strict=False)):
                if a != b:
                    offset = next((i for i, (x, y) in enumerate(zip(a.text, b.text, strict=False)) if x != y), 0)
                    if at or offset:
                        cuts.add((at, offset))
                    break
        return sorted(cuts)

    def _render_chat(
        self, model: LoadedModel, request: ChatRequest
    ) -> tuple[list[Segment], SamplingParams, str, list[dict[str, Any]], bool]:
        """The prompt's segments, the decoding rules, and whether the prompt opened the reasoning.

        The grammars are compiled here, off the event loop.
        """
        template = model.template
        active_tools = request.tools if request.tool_choice.mode != "none" else []
        messages = tool_calls.as_template_messages(
            conversation.normalize(request.messages), active_tools, native=template.supports_tools
        )
        kwargs = request.all_template_kwargs()
        check_kwargs(kwargs)  # before they are spread: a client's "messages" or "self" must be a 400, not a TypeError
        segments = _render_as_allowed(template, messages, active_tools if template.supports_tools else None, kwargs)
        fmt = model.format if not self.raw_reasoning else formats.FORMATS["generic"]
        # A template that ends its prompt with the reasoning opener (DeepSeek-R1's "<think>\n")
        # has the model start inside it.
        opened = fmt.reasoning is not None and _ends_with(segments, fmt.reasoning[0])
        sampling = self._with_stops(model, request.sampling)
        tool_mode = "none"
        text_schema = (
            request.json_schema
            if request.json_schema is not None
            else ({"type": "object"} if request.json_object else None)
        )
        if text_schema is not None:
            sampling = replace(sampling, grammar=_grammar_for_schema(text_schema, request.format_param))
        if active_tools:
            tool_mode = "forced" if request.tool_choice.mode in ("required", "function") else "auto"
            # The calls in the family's own syntax (under auto, lazily); a response format holds the text answer.
            calls = call_grammar(
                fmt,
                active_tools,
                request.tool_choice,
                parallel=request.parallel_tool_calls,
                in_reasoning=opened,
                text_schema=text_schema,
            )
            if calls is not None:
                sampling = replace(sampling, grammar=calls.gbnf, grammar_trigger=calls.trigger)
        if model.format.name != "generic":  # the family's markers are control tokens: the parser must see them
            sampling = replace(sampling, special_pieces=True)
        return segments, sampling, tool_mode, active_tools, opened

    @staticmethod
    def _with_stops(model: LoadedModel, sampling: SamplingParams) -> SamplingParams:
        extra = tuple(s for s in model.stops if s not in sampling.stop)
        return replace(sampling, stop=sampling.stop + extra) if extra and not sampling.ignore_eos else sampling

    # --- running ------------------------------------------------------------------

    async def _events(self, prepared: _Prepared, stream: TokenStream) -> AsyncGenerator[Event, None]:
        text = output.TextAssembler(prepared.sampling.stop)
        reader = output.reader_for(
            prepared.model.format,
            prepared.tool_mode,
            prepared.tools,
            raw_reasoning=self.raw_reasoning,
            in_reasoning=prepared.in_reasoning,
        )
        only_one = output.FirstCallOnly() if not prepared.parallel_tool_calls else None  # parallel_tool_calls: false
        budget = (
            output.ReasoningBudget(prepared.model.format, prepared.reasoning_budget, opened=prepared.in_reasoning)
            if prepared.reasoning_budget is not None
            else None
        )
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
                for event in reader.feed(piece, step.logprob):
                    kept = event if only_one is None else only_one.filter(event)
                    if kept is not None:
                        yield kept
                if budget is not None and budget.spent(piece):
                    stream.force(budget.end_marker)
                if stopped:
                    reason = "stop"
                    break
            for event in [*reader.feed(text.flush(), None), *reader.finish(truncated=reason == "length")]:
                kept = event if only_one is None else only_one.filter(event)
                if kept is None:
                    continue
                # a call cut off by max_tokens is still "length"
                if isinstance(kept, ToolCallsEvent) and reason != "length":
                    reason = "tool_calls"
                yield kept
            if not stream.cancelled:  # a client that hung up has no finish reason
                stream.stats.finish_reason = reason
            yield Finished(
                reason,
                Usage(len(prepared.prompt), completion_tokens, stream.stats.cached_tokens),
                stopped if reason == "stop" else None,
            )
        finally:
            stream.cancel()


def _marked(message: dict[str, Any]) -> dict[str, Any] | None:
    """The message with an invisible mark in front of its text (no template trims it); None if it has no text."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": "\u2063" + content}
    if isinstance(content, list) and content and isinstance(content[0], dict) and content[0].get("type") == "text":
        return {
            **message,
            "content": [{**content[0], "text": "\u2063" + str(content[0].get("text", ""))}, *content[1:]],
        }
    return None


def _render_as_allowed(
    template: ChatTemplate, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]
) -> list[Segment]:
    """The template's rendering.

    When it refuses the conversation's shape, it renders again with the shape reworked as it allows.
    """
    tools = tool_calls.template_tools(tools) if tools else None
    try:
        return template.render(messages, tools=tools, **kwargs)
    except InvalidRequest as refusal:
        for reshape in conversation.RESHAPES:
            reshaped = reshape(messages)
            if reshaped == messages:
                continue
            messages = reshaped
            try:
                return template.render(messages, tools=tools, **kwargs)
            except InvalidRequest:
                continue
        raise refusal from None


def _ends_with(segments: list[Segment], marker: str) -> bool:
    """Whether the rendered prompt ends with this marker (whitespace after it aside)."""
    return "".join(s.text for s in segments[-4:]).rstrip().endswith(marker)


def _check_vocabulary(model: LoadedModel, tokens: list[int], param: str) -> None:
    """Refuse token ids outside the model's vocabulary."""
    n_vocab = model.facts.n_vocab
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"{param} has token {bad}, outside this model's vocabulary of {n_vocab}", param)


def _check_fits(model: LoadedModel, prompt_tokens: int) -> None:
    """Refuse a prompt that leaves no room to generate a single token."""
    if prompt_tokens >= model.facts.n_ctx:
        raise ContextLengthExceeded(prompt_tokens, model.facts.n_ctx)


def _grammar_for_schema(schema: dict[str, Any], param: str) -> str:
    """GBNF that admits exactly the JSON documents a schema allows; InvalidRequest naming `param` when it cannot.

    Schemas beyond json_grammar's budget are refused before anything is built from them.
    """
    from sovereign.engine.json_grammar import (
        SchemaInvalid,
        SchemaTooComplex,
        check_budget,
        check_valid,
        json_schema_to_gbnf,
    )

    try:
        check_budget(schema)  # first: the metaschema's walk is bounded by it
        check_valid(schema)
        return json_schema_to_gbnf(schema)
    except SchemaInvalid as exc:
        raise InvalidRequest(f"the JSON schema is not valid: {exc}", param) from None
    except SchemaTooComplex as exc:
        raise InvalidRequest(f"the JSON schema is too complex to enforce: {exc}", param) from None
    except RecursionError:
        raise InvalidRequest("the JSON schema cannot be enforced: it nests too deeply", param) from None
    except Exception as exc:  # noqa: BLE001 - the converter raises bare Exceptions and asserts on what it cannot handle
        raise InvalidRequest(f"the JSON schema cannot be enforced: {_converter_reason(exc)}", param) from None


def _converter_reason(exc: Exception) -> str:
    """The converter's complaint in the client's terms (its own mentions internal names and whole schemas)."""
    text = str(exc)
    if unresolved := re.match(r"Error resolving ref input(#\S*):", text):
        return f"the $ref '{unresolved[1]}' points at nothing in this schema"
    if isinstance(exc, KeyError) and str(exc.args[0] if exc.args else "").startswith("#"):
        return f"the $ref '{exc.args[0]}' cannot be resolved (does it refer to itself?)"
    if text.startswith("Unsupported ref"):
        return f"{text} (only refs within the schema, such as #/$defs/name, are supported)"
    return text if text and len(text) <= 200 else type(exc).__name__
