"""Each family's output format: recorded outputs parsed whole and in random small pieces give the same message.

Vectors follow llama.cpp's tests/test-chat.cpp (its `special_function` / `arg1` fixtures) and the model cards.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from sovereign.engine.formats import (
    FORMATS,
    ContentDelta,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    detect,
)

THOUGHT = "I'm\nthinking"
ANSWER = "Hello, world!\nWhat's up?"
SF = {"arg1": 1}
SPECIAL = {
    "type": "function",
    "function": {
        "name": "special_function",
        "parameters": {"type": "object", "properties": {"arg1": {"type": "integer"}}},
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
TOOLS = [SPECIAL, WEATHER]


@dataclass
class Message:
    """The aggregate of a stream of events."""

    content: str = ""
    reasoning: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> tuple[str, str, list[tuple[str, Any]]]:
        return self.content, self.reasoning, [(c["name"], json.loads(c["args"])) for c in self.calls]


def aggregate(events: list[Any]) -> Message:
    """Fold events into a message, checking their order is well formed."""
    msg, open_calls = Message(), set()
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            msg.content += event.text
        elif isinstance(event, ReasoningDelta):
            msg.reasoning += event.text
        elif isinstance(event, ToolCallStart):
            assert event.index == len(msg.calls) and event.id and event.name
            msg.calls.append({"name": event.name, "args": ""})
            open_calls.add(event.index)
        elif isinstance(event, ToolCallArgsDelta):
            assert event.index in open_calls
            msg.calls[event.index]["args"] += event.text
        elif isinstance(event, ToolCallEnd):
            open_calls.remove(event.index)
    assert not open_calls, "every started call is ended"
    return msg


def run(fmt: str, text: str, seed: int | None = None, tools: list[dict[str, Any]] | None = TOOLS, **kw: Any) -> Message:
    """Parse text whole (seed None) or in pieces of 1-3 characters."""
    parser = FORMATS[fmt].parser(tools, **kw)
    events: list[Any] = []
    if seed is None:
        events += parser.feed(text)
    else:
        rng, i = random.Random(seed), 0
        while i < len(text):
            n = rng.randint(1, 3)
            events += parser.feed(text[i : i + n])
            i += n
    events += parser.finish()
    return aggregate(events)


def check(
    fmt: str, text: str, content: str = "", reasoning: str = "", calls: list[tuple[str, Any]] | None = None, **kw: Any
) -> None:
    """Whole and streamed parses all give the expected message."""
    expected = (content, reasoning, calls or [])
    assert run(fmt, text, **kw).summary() == expected
    for seed in range(6):
        assert run(fmt, text, seed=seed, **kw).summary() == expected, f"seed {seed}"


CASES: list[tuple[str, str, str, str, list[tuple[str, Any]], dict[str, Any]]] = [
    # (family, output, content, reasoning, calls, parser kwargs)
    ("hermes", ANSWER, ANSWER, "", [], {}),
    ("hermes", f"<think>{THOUGHT}</think>{ANSWER}", ANSWER, THOUGHT, [], {}),
    ("hermes", f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}", ANSWER, THOUGHT, [], {}),
    (
        "hermes",
        '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "hermes",
        f"<think>\n{THOUGHT}\n</think>\n\nLet me check.\n"
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name": "special_function", "arguments": {{"arg1": 1}}}}\n</tool_call>',
        "Let me check.",
        THOUGHT,
        [("get_weather", {"city": "Paris"}), ("special_function", SF)],
        {},
    ),
    (
        "hermes",
        "Use <b>bold</b> and a < b, or <tool but not a call.",
        "Use <b>bold</b> and a < b, or <tool but not a call.",
        "",
        [],
        {},
    ),
    ("hermes", f"{THOUGHT}</think>{ANSWER}", ANSWER, THOUGHT, [], {"in_reasoning": True}),
    (
        "hermes",
        '<tool_call>\n{"name": "special_function", "arguments": "{\\"arg1\\": 1}"}\n</tool_call>',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "qwen3_coder",
        "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n</tool_call>",
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "qwen3_coder",
        "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n1984\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n</tool_call>",
        "Sure.",
        "",
        [("get_weather", {"city": "1984", "days": 3}), ("special_function", SF)],
        {},
    ),
    ("llama3", '{"name": "special_function", "parameters": {"arg1": 1}}', "", "", [("special_function", SF)], {}),
    (
        "llama3",
        '{"type": "function", "name": "special_function", "parameters": {"arg1": 1}}<|eom_id|>',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "special_function", "parameters": {"arg1": 1}}',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "llama3",
        '<|python_tag|>brave_search.call(query="weather in Paris")<|eom_id|>',
        "",
        "",
        [("brave_search", {"query": "weather in Paris"})],
        {},
    ),
    ("llama3", "<|python_tag|>print('hey')", "", "", [("python", {"code": "print('hey')"})], {}),
    ("llama3", '{"answer": 42}', '{"answer": 42}', "", [], {}),
    ("llama3", ANSWER, ANSWER, "", [], {}),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    ("mistral", '[TOOL_CALLS]special_function[ARGS]{"arg1":1}', "", "", [("special_function", SF)], {}),
    (
        "mistral",
        f'[THINK]{THOUGHT}[/THINK][TOOL_CALLS]special_function[ARGS]{{"arg1":1}}'
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        "",
        THOUGHT,
        [("special_function", SF), ("get_weather", {"city": "Paris"})],
        {},
    ),
    ("mistral", f"[THINK]{THOUGHT}[/THINK]{ANSWER}", ANSWER, THOUGHT, [], {}),
    (
        "mistral",
        '[TOOL_CALLS]special_function[CALL_ID]abc123def[ARGS]{"arg1": 1}',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "phi4_mini",
        'functools[{"name": "special_function", "arguments": {"arg1": 1}}]',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "phi4_mini",
        "functools[\n"
        '  {"name": "get_weather", "arguments": {"city": "Tokyo"}},\n'
        '  {"name": "special_function", "arguments": {"arg1": 1}}\n'
        "]",
        "",
        "",
        [("get_weather", {"city": "Tokyo"}), ("special_function", SF)],
        {},
    ),
    (
        "phi4_mini",
        'Let me check.<|tool_call|>[{"name": "special_function", "arguments": {"arg1": 1}}]<|/tool_call|>',
        "Let me check.",
        "",
        [("special_function", SF)],
        {},
    ),
    ("deepseek_r1", f"<think>{THOUGHT}</think>{ANSWER}", ANSWER, THOUGHT, [], {}),
    ("deepseek_r1", f"{THOUGHT}</think>\n\n{ANSWER}", ANSWER, THOUGHT, [], {"in_reasoning": True}),
    (
        "deepseek_r1",
        f"{THOUGHT}</think>\n\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n"
        '```json\n{"arg1": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "",
        THOUGHT,
        [("special_function", SF)],
        {"in_reasoning": True},
    ),
    (
        "deepseek_r1",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n"
        '```json\n{"arg1": 1}\n```<｜tool▁call▁end｜>\n'
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "",
        "",
        [("special_function", SF), ("get_weather", {"city": "Paris"})],
        {},
    ),
    (
        "deepseek_v3_1",
        "Hi<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>special_function<｜tool▁sep｜>"
        '{"arg1": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "Hi",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "gpt_oss",
        f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>",
        ANSWER,
        THOUGHT,
        [],
        {},
    ),
    (
        "gpt_oss",
        f"<|channel|>analysis<|message|>{THOUGHT}<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.special_function "
        '<|constrain|>json<|message|>{"arg1": 1}<|call|>',
        "",
        THOUGHT,
        [("special_function", SF)],
        {},
    ),
    (
        "gpt_oss",
        ' to=functions.special_function<|channel|>commentary <|constrain|>json<|message|>{"arg1": 1}',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "gpt_oss",
        "<|channel|>commentary<|message|>Checking.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        "Checking.",
        "",
        [("get_weather", {"city": "Paris"})],
        {},
    ),
    ("gpt_oss", ANSWER, ANSWER, "", [], {}),
    (
        "granite",
        '<|tool_call|>[{"name": "special_function", "arguments": {"arg1": 1}}]',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    ("granite", f"<think>{THOUGHT}</think><response>{ANSWER}</response>", ANSWER, THOUGHT, [], {}),
    (
        "command_r7b",
        f"<|START_THINKING|>{THOUGHT}<|END_THINKING|><|START_RESPONSE|>{ANSWER}<|END_RESPONSE|>",
        ANSWER,
        THOUGHT,
        [],
        {},
    ),
    (
        "command_r7b",
        f"<|START_THINKING|>{THOUGHT}<|END_THINKING|><|START_ACTION|>[\n"
        '    {"tool_call_id": "0", "tool_name": "special_function", "parameters": {"arg1": 1}}\n'
        "]<|END_ACTION|>",
        "",
        THOUGHT,
        [("special_function", SF)],
        {},
    ),
    ("glm45", f"\n<think>{THOUGHT}</think>\n{ANSWER}", ANSWER, THOUGHT, [], {}),
    (
        "glm45",
        "\n<tool_call>special_function\n<arg_key>arg1</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "glm45",
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
        "<tool_call>special_function\n<arg_key>arg1</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
        "",
        "",
        [("get_weather", {"city": "Paris", "days": 2}), ("special_function", SF)],
        {},
    ),
    (
        "kimi_k2",
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.special_function:0<|tool_call_argument_begin|>"
        '{"arg1": 1}<|tool_call_end|><|tool_calls_section_end|>',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "kimi_k2",
        f"<think>{THOUGHT}</think>Checking.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.special_function:1<|tool_call_argument_begin|>{"arg1": 1}<|tool_call_end|>'
        "<|tool_calls_section_end|>",
        "Checking.",
        THOUGHT,
        [("get_weather", {"city": "Paris"}), ("special_function", SF)],
        {},
    ),
    ("generic", '{"name": "special_function", "arguments": {"arg1": 1}}', "", "", [("special_function", SF)], {}),
    (
        "generic",
        '[{"name": "special_function", "arguments": {"arg1": 1}}, '
        '{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        "",
        [("special_function", SF), ("get_weather", {"city": "Paris"})],
        {},
    ),
    (
        "generic",
        '```json\n{"name": "special_function", "arguments": {"arg1": 1}}\n```',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    (
        "generic",
        '<tool_call>{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>',
        "",
        "",
        [("special_function", SF)],
        {},
    ),
    ("generic", "```python\nprint(1)\n```", "```python\nprint(1)\n```", "", [], {}),
    ("generic", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', "", [], {}),
    ("generic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", "", [], {}),
    ("generic", ANSWER, ANSWER, "", [], {}),
]


@pytest.mark.parametrize(
    ("fmt", "text", "content", "reasoning", "calls", "kw"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_vectors_whole_and_streamed(
    fmt: str, text: str, content: str, reasoning: str, calls: list[tuple[str, Any]], kw: dict[str, Any]
) -> None:
    check(fmt, text, content, reasoning, calls, **kw)


# Snippets of real chat templates, each cut down to the lines that carry its markers.
# Sources: ggml-org/llama.cpp models/templates/*.jinja (DeepSeek-R1-Distill-Qwen-32B, DeepSeek-V3.1,
# llama-cpp-microsoft-Phi-4-mini-instruct, glm_4_5, moonshotai-Kimi-K2) and the models' Hugging Face
# tokenizer_config.json chat templates for the others.
TEMPLATES: dict[str, tuple[str, bool]] = {
    "hermes": (
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}",
        False,
    ),
    "qwen3_coder": (
        "<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n</function>\\n</tool_call>"
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}",
        False,
    ),
    "llama3": (
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "{{- '<|python_tag|>' + tool_call.name + '.call(' }}\n"
        "{{- 'Respond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.\' }}',
        False,
    ),
    "mistral": (
        "{{- '[TOOL_CALLS][' }}{%- for tool_call in message.tool_calls %}{{- tool_call.function|tojson }}",
        False,
    ),
    "phi4_mini": (
        "{{- '<|tool|>' + (tool['function'] | tojson) + '<|/tool|>' -}}\n"
        'To use a tool, respond in this format: <|tool_call|>{"name": "foo", "arguments": {"a": 1}}<|/tool_call|>',
        False,
    ),
    "deepseek_r1": (
        "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
        "+ tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' "
        "+ '```' + '<｜tool▁call▁end｜>'}}\n"
        "{%- if add_generation_prompt and not ns.is_tool -%}{{'<｜Assistant｜><think>\\n'}}\n{%- endif %}",
        True,
    ),
    "deepseek_v3_1": (
        "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' "
        "+ tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}\n"
        "{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool -%}{{'<｜Assistant｜>'}}\n"
        "  {%- if not thinking -%}{{'</think>'}}\n    {%- else -%}{{'<think>'}}\n  {%- endif -%}\n{%- endif %}",
        False,
    ),
    "gpt_oss": (
        '{{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}'
        '{{- "<|start|>assistant" }}',
        False,
    ),
    "granite": (
        "<|start_of_role|>available_tools<|end_of_role|>{{- tools | tojson(indent=4) }}<|end_of_text|>\n"
        "{{- '<|tool_call|>' + message.tool_calls | tojson }}",
        False,
    ),
    "command_r7b": (
        "{{ '<|START_ACTION|>[\\n' }}{%- for tc in message.tool_calls %}"
        '{"tool_call_id": "{{ tool_idx }}", "tool_name": "{{ tc[\'function\'][\'name\'] }}"',
        False,
    ),
    "glm45": (
        "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n</tool_call>",
        False,
    ),
    "kimi_k2": (
        "{% if tools -%}\n    {{ '<|im_system|>tool_declare<|im_middle|>' -}}\n    {{- tools | tojson -}}",
        False,
    ),
    "generic": (
        "{{ bos_token }}{%- for message in loop_messages %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{%- endfor %}",
        False,
    ),
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_detect_from_template_markers(family: str) -> None:
    template, opens = TEMPLATES[family]
    fmt = detect(template)
    assert fmt.name == family
    assert fmt.opens_reasoning is opens


def test_detect_unknown_is_generic() -> None:
    assert detect(None).name == "generic" and detect("").name == "generic"
    assert detect("{{ messages }}").native_tools is False
    assert detect("<|START_THINKING|>{{ x }}<|START_ACTION|>").reasoning == ("<|START_THINKING|>", "<|END_THINKING|>")


def events(fmt: str, pieces: list[str], tools: list[dict[str, Any]] | None = TOOLS) -> list[list[Any]]:
    """The events after each piece, and after finish, in order."""
    parser = FORMATS[fmt].parser(tools)
    return [parser.feed(p) for p in pieces] + [parser.finish()]


def test_partial_tags_held_only_while_they_can_be_markup() -> None:
    steps = events(
        "hermes", ["Hi <tool_", 'call>\n{"name": "special_function", ', '"arguments": {"ar', 'g1": 1}}\n</tool_call>']
    )
    assert steps[0] == [ContentDelta("Hi")]
    assert isinstance(steps[1][0], ToolCallStart) and steps[1][0].name == "special_function"
    assert steps[2] == [ToolCallArgsDelta(0, '{"ar')]  # arguments stream as the model writes them
    assert steps[3] == [ToolCallArgsDelta(0, 'g1": 1}'), ToolCallEnd(0)]
    steps = events("hermes", ["Use <b", ">bold</b>"])
    assert steps[0] == [ContentDelta("Use <b")] and steps[1] == [ContentDelta(">bold</b>")]


@pytest.mark.parametrize(
    ("fmt", "text", "content"),
    [
        ("hermes", 'Hi <tool_call>\n{"name": ', 'Hi <tool_call>\n{"name":'),
        ("hermes", "Hi <tool_call>not json", "Hi <tool_call>not json"),
        ("hermes", "Hi <tool_", "Hi <tool_"),
        ("mistral", "[TOOL_CALLS] sure, here", "[TOOL_CALLS] sure, here"),
        ("deepseek_r1", "<｜tool▁calls▁begin｜>oops", "<｜tool▁calls▁begin｜>oops"),
        ("kimi_k2", "<|tool_calls_section_begin|>", "<|tool_calls_section_begin|>"),
        ("gpt_oss", "<|channel|>final", "<|channel|>final"),
        ("generic", '{"name": "spec', '{"name": "spec'),
    ],
)
def test_malformed_markup_falls_back_to_content(fmt: str, text: str, content: str) -> None:
    for seed in (None, 0, 1):
        assert run(fmt, text, seed=seed).summary() == (content, "", [])


def test_truncated_call_is_closed_with_what_arrived() -> None:
    msg = run("hermes", '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1')
    assert msg.calls == [{"name": "special_function", "args": '{"arg1": 1'}]
    assert run("generic", '{"name": "special_function"').summary() == ("", "", [("special_function", {})])


def test_xml_parameters_follow_schema_types() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    assert run("qwen3_coder", text).summary()[2] == [("get_weather", {"city": "42", "days": 3})]
    assert run("qwen3_coder", text, tools=None).summary()[2] == [("get_weather", {"city": 42, "days": 3})]


def test_long_arguments_stream_in_reasonable_time() -> None:
    body = json.dumps({"arg1": "x" * 40_000})
    text = '<tool_call>\n{"name": "special_function", "arguments": ' + body + "}\n</tool_call>"
    parser = FORMATS["hermes"].parser(TOOLS)
    out: list[Any] = []
    for i in range(0, len(text), 4):
        out += parser.feed(text[i : i + 4])
    out += parser.finish()
    assert json.loads(aggregate(out).calls[0]["args"]) == json.loads(body)
