"""No request may kill or wedge the server: grammars, sampling, templates and tokenizing under hostile input.

Each reproducer from the bad-input run is kept here: the json_grammar budget and spelling without a
model, the sampler and tokenizer on the real model in-process, templates on their own, and the
original HTTP reproducers against the real server (each must answer 200 or 4xx within seconds and
leave /health up).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sovereign.engine import chat_template as chat_template_module
from sovereign.engine import json_grammar
from sovereign.engine.chat_template import FALLBACK_TEMPLATE, MAX_RENDER_SECONDS, ChatTemplate
from sovereign.engine.json_grammar import MAX_REPEAT, SchemaTooComplex, _times, check_budget, json_schema_to_gbnf
from sovereign.engine.requests import SamplingParams
from sovereign.engine.runtime import grammar_sampler
from sovereign.engine.runtime.backend import BatchEntry, GrammarSampler, LlamaBackend
from sovereign.engine.wire import LoadOptions
from sovereign.errors import BadChatTemplate, ContextLengthExceeded, InvalidRequest, ModelLoadError
from sovereign.refs import parse_name
from sovereign.store import Store
from tests.conftest import GEMMA
from tests.servers import ServerProcess

CHAT = "<start_of_turn>user\nAnswer in JSON.<end_of_turn>\n<start_of_turn>model\n"

# The in-process checks time this thread's CPU (time.thread_time), not the wall clock: the work they bound
# (schema checks, grammar compiles and checks, tokenizing, rendering) runs on the calling thread, and its CPU
# seconds do not stretch when other processes take the machine's cores (wall time did, up to 60x here).


def nested_arrays(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# --- the schema budget, before anything is built ----------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 1_000_000},
        {"type": "string", "minLength": 10**9},  # was expanded in Python first: 6.5 GB before a 400
        {"type": "string", "pattern": "^a{1000000000}$"},
        {"type": "string", "pattern": "^(ab){2,1000001}$"},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 20_000_000},
        {"enum": [f"v{i}" for i in range(100_000)]},  # wedged a scheduler thread for 20 minutes
        nested_arrays(200),  # hung
        {"type": "string", "maxLength": -1},
        {"type": "string", "maxLength": float("inf")},
        {"type": "string", "pattern": "^" + "a" * 5_000 + "$"},
    ],
)
def test_schemas_beyond_the_budget_are_refused_before_anything_is_built(
    schema: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a grammar was built for a schema beyond the budget")

    monkeypatch.setattr(json_grammar, "_BoundedSchemaConverter", build)
    started = time.thread_time()
    with pytest.raises(SchemaTooComplex):
        json_schema_to_gbnf(schema)
    # Milliseconds of CPU (6 ms for the 100,000-value enum); the hangs these once caused ran for minutes.
    assert time.thread_time() - started < 2


def test_budget_reads_keywords_only_where_they_are_keywords() -> None:
    # Properties may be named like keywords; their values are schemas, not counts or patterns.
    check_budget(
        {
            "type": "object",
            "properties": {"maxLength": {"type": "string"}, "enum": {"type": "integer"}, "pattern": {"type": "string"}},
        }
    )
    assert "maxLength-kv" in json_schema_to_gbnf({"type": "object", "properties": {"maxLength": {"type": "string"}}})


def as_regex(gbnf_expression: str) -> re.Pattern[str]:
    """A repetition of the literal "a", as _times spells it, read as a regular expression (same syntax)."""
    return re.compile(gbnf_expression.replace('"a"', "a").replace(" ", ""))


@pytest.mark.parametrize(
    "low, high",
    [
        (0, 0),
        (0, 1),
        (1, 1),
        (3, 7),
        (0, 500),
        (0, 501),
        (2, 1000),
        (0, 1499),
        (999, 2001),
        (1234, 5678),
        (0, None),
        (600, None),
    ],
)
def test_repetitions_are_exact_and_never_exceed_llama_cpp_s_repetition_limit(low: int, high: int | None) -> None:
    expression = _times('"a"', low, high)
    pattern = as_regex(expression)
    top = (high if high is not None else low) + 600
    for count in range(0, top):
        assert bool(pattern.fullmatch("a" * count)) == (low <= count and (high is None or count <= high)), (
            low,
            high,
            count,
        )
    # llama.cpp's parser refuses a {m,n} past 2,000 (and a group's rules x count past 2,000).
    assert all(int(n) <= 2_000 for n in re.findall(r"\d+", expression))


def test_large_repetitions_stay_small_grammars() -> None:
    for schema in (
        {"type": "string", "maxLength": MAX_REPEAT},
        {"type": "string", "minLength": MAX_REPEAT},
        {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT},
    ):
        assert len(json_schema_to_gbnf(schema)) < 2_000


def grammar_regex(gbnf: str) -> re.Pattern[str]:
    """An enum grammar (literals, rule references, groups; no recursion) as one regular expression."""
    rules = dict(line.split(" ::= ", 1) for line in gbnf.splitlines())

    def expand(body: str) -> str:
        out = []
        for token in re.findall(r'"(?:[^"\\]|\\.)*"|[A-Za-z0-9-]+|[()|?]', body):
            if token.startswith('"'):
                out.append(re.escape(json.loads(token)))
            elif token in "()|?":
                out.append(token if token != "(" else "(?:")
            else:
                out.append(f"(?:{expand(rules[token])})")
        return "".join(out)

    return re.compile(expand(rules["root"]))


def test_enums_are_tries_matching_exactly_their_values() -> None:
    values = ["a", "ab", "abc", "", "b", 1, 12, None, True, "a\nb", 'q"x', "é", "back\\slash", [1, 2], {"k": "v"}]
    gbnf = json_schema_to_gbnf({"enum": values})
    pattern = grammar_regex(gbnf)
    for value in values:
        assert pattern.fullmatch(json.dumps(value)), value
    for other in ['"abcd"', '"c"', "2", '"a\nb"', '"A"', "nul"]:
        assert not pattern.fullmatch(other), other
    many = [f"value{i}" for i in range(5_000)]
    big = grammar_regex(json_schema_to_gbnf({"enum": many}))
    assert all(big.fullmatch(json.dumps(v)) for v in random.sample(many, 200))
    assert not big.fullmatch('"value5000"')


def test_strings_cannot_hold_raw_control_characters() -> None:
    # JSON forbids them; the original rule let a model write a raw line break inside a string.
    assert r"\x00-\x1F" in json_schema_to_gbnf({"type": "object", "properties": {"a": {"type": "string"}}})


# --- the sampler and tokenizer, in-process on the real model -----------------------------------


@pytest.fixture(scope="module")
def backend(real_model_home: Path, use_extra_bufts: bool) -> Iterator[LlamaBackend]:
    store = Store(real_model_home)
    options = LoadOptions(n_ctx=8192, n_parallel=1, n_threads=2, use_extra_bufts=use_extra_bufts)
    loaded = LlamaBackend(store.model_path(store.require(parse_name(GEMMA))), options)
    yield loaded
    loaded.close()


def generate(backend: LlamaBackend, params: SamplingParams, limit: int = 40) -> tuple[str, bool, float]:
    """Text from a short chat prompt, whether it ended with end-of-generation, and the slowest token's CPU seconds.

    Sampling (the grammar check included) runs on this thread, so its CPU time is the cost of the draw, however
    busy the machine's other cores are; decoding (on llama.cpp's threads) is not timed.
    """
    backend.forget(0)
    prompt = backend.with_bos(backend.tokenize(CHAT, special=True))
    backend.decode([BatchEntry(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    sampler = backend.sampler(params, prompt)
    text, index, slowest = b"", len(prompt) - 1, 0.0
    try:
        for step in range(limit):
            started = time.thread_time()
            token = backend.sample(sampler, index)
            slowest = max(slowest, time.thread_time() - started)
            if backend.is_end_of_generation(token):
                return text.decode("utf-8", "replace"), True, slowest
            text += backend.piece(token)
            backend.decode([BatchEntry(token, len(prompt) + step, 0, True)])
            index = 0
    finally:
        sampler.close()
    return text.decode("utf-8", "replace"), False, slowest


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_complete_grammar_ends_the_output_even_with_ignore_eos(backend: LlamaBackend, temperature: float) -> None:
    """Killed the process: the grammar allowed only end-of-generation, and ignore_eos had banned it."""
    text, ended, _ = generate(
        backend, SamplingParams(temperature=temperature, ignore_eos=True, grammar=json_schema_to_gbnf({"const": "x"}))
    )
    assert (text, ended) == ('"x"', True)
    eog = {t: float("-inf") for t in backend.end_of_generation_tokens}
    text, ended, _ = generate(
        backend,
        SamplingParams(
            temperature=0,
            logit_bias=eog,
            grammar=json_schema_to_gbnf(
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
            ),
        ),
        60,
    )
    assert ended and json.loads(text).keys() == {"a"}


def test_a_bias_that_bans_everything_the_grammar_allows_is_an_invalid_request(backend: LlamaBackend) -> None:
    """Killed the process: every candidate -inf, then the grammar's accept threw through the C API."""
    grammar = json_schema_to_gbnf({"const": "x"})
    quotes = {t: float("-inf") for t in range(backend.n_vocab) if backend.piece(t).startswith(b'"')}
    with pytest.raises(InvalidRequest) as refused:
        backend.sampler(SamplingParams(temperature=0, logit_bias=quotes, grammar=grammar), [backend.bos])
    assert refused.value.param == "logit_bias"
    # Banned only later: the request ends with the error (the scheduler ends that request alone).
    xs = {t: float("-inf") for t in range(backend.n_vocab) if backend.piece(t).startswith(b"x")}
    for temperature in (0.0, 0.8):
        with pytest.raises(InvalidRequest, match="bans every token"):
            generate(backend, SamplingParams(temperature=temperature, logit_bias=xs, grammar=grammar))


def test_greedy_decoding_under_a_grammar_matches_llama_cpp_s_own_chain(backend: LlamaBackend) -> None:
    """Checking the likeliest tokens first is exact: the same tokens as bias + grammar + greedy in llama.cpp."""
    from llama_cpp import _internals

    grammar = json_schema_to_gbnf(
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
            "required": ["name", "age"],
        }
    )
    ours, _, _ = generate(backend, SamplingParams(temperature=0, grammar=grammar), 30)
    backend.forget(0)
    prompt = backend.with_bos(backend.tokenize(CHAT, special=True))
    backend.decode([BatchEntry(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    chain = _internals.LlamaSampler()
    llama = backend._llama
    llama.llama_sampler_chain_add(
        chain.sampler, llama.llama_sampler_init_grammar(backend.vocab, grammar.encode(), b"root")
    )
    chain.add_greedy()
    theirs, index = b"", len(prompt) - 1
    for step in range(30):
        token = llama.llama_sampler_sample(chain.sampler, backend.ctx.ctx, index)
        if backend.is_end_of_generation(token):
            break
        theirs += backend.piece(token)
        backend.decode([BatchEntry(token, len(prompt) + step, 0, True)])
        index = 0
    chain.close()
    assert ours == theirs.decode("utf-8", "replace")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 20_000},  # segfaulted llama.cpp's parser
        {"type": "string", "maxLength": 5_000},  # 5,000-18,000 were refused
        {"type": "string", "minLength": MAX_REPEAT},
        {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT},
        {"type": "string", "pattern": "^a{1,100000}$"},  # took 14-16 s to refuse
        {"enum": [f"value{i}" for i in range(10_000)]},  # 1,000 values cost 6 s a token as flat alternatives
        {
            "oneOf": [
                {"type": "object", "properties": {f"k{i}": {"type": "string"}}, "required": [f"k{i}"]}
                for i in range(100)
            ]
        },
    ],
)
def test_large_but_allowed_grammars_compile_and_sample_fast(backend: LlamaBackend, schema: dict[str, Any]) -> None:
    started = time.thread_time()
    grammar = json_schema_to_gbnf(schema)
    # CPU seconds: 20 ms at most (the 10,000-value enum); the a{1,100000} pattern once took 14-16 s.
    assert time.thread_time() - started < 1
    for temperature in (0.0, 0.8):
        _, _, slowest = generate(backend, SamplingParams(temperature=temperature, seed=1, grammar=grammar), 12)
        # CPU seconds a token: 5-20 ms here; checking the whole vocabulary used to cost 0.03-6 s a token.
        assert slowest < 2.0


def test_a_grammar_check_past_its_time_budget_ends_the_request(
    backend: LlamaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grammar_sampler, "MAX_SAMPLE_SECONDS", 0.0)
    monkeypatch.setattr(grammar_sampler, "STAGES", (1,))
    monkeypatch.setattr(grammar_sampler, "CHECK_CHUNK", 1)
    with pytest.raises(InvalidRequest, match="too costly"):
        generate(backend, SamplingParams(temperature=0, grammar=json_schema_to_gbnf({"const": "zqzqzq"})))


def test_samplers_with_a_grammar_are_grammar_samplers(backend: LlamaBackend) -> None:
    sampler = backend.sampler(
        SamplingParams(temperature=0.7, repeat_penalty=1.2, grammar=json_schema_to_gbnf({"type": "object"})),
        [backend.bos, 10, 11],
    )
    assert isinstance(sampler, GrammarSampler)
    sampler.close()
    sampler.close()  # twice is harmless


TOKENIZER_PARTS = [
    "\n",
    "\n\n",
    "\n" * 40,
    "\t",
    "\t" * 33,
    " ",
    "  ",
    " " * 31,
    " " * 32,
    " " * 33,
    " " * 63,
    "x",
    "word",
    " the",
    "<b>",
    "</b>",
    "<bbox>",
    "<html>",
    "<s>",
    "</s>",
    "<b",
    "b>",
    "é",
    "日本",
    "<start_of_turn>",
    "<end_of_turn>",
    "\r\n",
    "{",
    '"',
    "0",
    ".",
    "▁",
    "<unused0>",
    "\n ",
    " \n",
    "<start_of_image>",
    "🙂",
]


def test_tokenizing_in_pieces_gives_exactly_the_tokens_of_the_whole(backend: LlamaBackend) -> None:
    cuts = backend._tokenizer_cuts
    assert cuts.plain is not None and cuts.special is not None
    rng = random.Random(7)
    pieces_seen = 0
    for _ in range(1_500):
        data = "".join(rng.choice(TOKENIZER_PARTS) for _ in range(rng.randint(1, 60))).encode()
        for special, cutter in ((False, cuts.plain), (True, cuts.special)):
            pieces = list(cutter.pieces(data, size=rng.randint(1, 24)))
            assert b"".join(pieces) == data
            pieces_seen += len(pieces)
            assert [t for p in pieces for t in backend._tokenize_bytes(p, special)] == backend._tokenize_bytes(
                data, special
            ), (data, pieces)
    assert pieces_seen > 10_000  # the cuts were really exercised


@pytest.mark.parametrize("unit", ["x\n", "x\t", "x<b>", "x  ", "hello world\n"])
def test_tokenizing_is_linear(backend: LlamaBackend, unit: str) -> None:
    """'x\\n' x 20,000 took 13 s: llama.cpp's split of special tokens is quadratic in how many it finds."""
    text = unit * 20_000
    assert backend._tokenizer_cuts.plain is not None  # the one scan of the vocabulary (0.4 s), outside the timing
    started = time.thread_time()
    tokens = backend.tokenize(text, special=False)
    # CPU seconds (tokenizing runs on this thread): about 0.05 s here, where the quadratic split took 13 s.
    assert time.thread_time() - started < 1.0
    assert len(tokens) >= 20_000


def test_text_that_cannot_fit_is_refused_before_tokenizing(
    backend: LlamaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert backend._tokenizer_cuts.plain is not None  # the one scan of the vocabulary (0.4 s), outside the timing
    calls: list[int] = []
    monkeypatch.setattr(LlamaBackend, "_tokenize_bytes", lambda _self, data, _special: calls.append(len(data)) or [])
    started = time.thread_time()
    with pytest.raises(ContextLengthExceeded) as refused:
        backend.tokenize("x\n" * (5 * 2**20), special=False)  # 50 MB took 113 s
    assert calls == [], "llama.cpp was asked to tokenize text that cannot fit"
    # CPU seconds: encoding 10 MiB and comparing its length takes milliseconds; no tokenizing may happen.
    assert time.thread_time() - started < 1.0
    assert refused.value.prompt_tokens > backend.n_ctx


# --- templates ------------------------------------------------------------------------------------


def render(source: str, messages: list[dict[str, Any]] | None = None) -> str:
    segments = ChatTemplate(source, origin="catalog").render(messages or [{"role": "user", "content": "hi"}])
    return "".join(s.text for s in segments)


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(10**9) %}x{% endfor %}",  # a 500
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # recursion: a 500
        "{{ 'x' * 10**9 }}",
        "{{ [0] * 10**9 }}",
        "{{ '%1000000000d' % 1 }}",
        "{{ 7 ** 1000000 }}",  # (Jinja reads 7 ** 10 ** 9 as (7 ** 10) ** 9)
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
        "{{ ns.s | length }}",
        "{% for i in range(10000) %}{{ 'y' * 10000 }}{% endfor %}",
        "{{ messages[5]['content'] }}",
    ],
)
def test_runaway_templates_are_invalid_requests_within_seconds(source: str) -> None:
    started = time.thread_time()
    with pytest.raises(InvalidRequest) as refused:
        render(source)
    assert refused.value.param == "messages"
    # CPU seconds: the limits refuse each in under 30 ms; even the backstop (the render's wall-clock budget)
    # ends a render before it has used MAX_RENDER_SECONDS of this thread's CPU.
    assert time.thread_time() - started < MAX_RENDER_SECONDS + 1


def test_exponential_recursion_stops_at_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template_module, "MAX_RENDER_SECONDS", 0.5)
    started = time.thread_time()
    with pytest.raises(InvalidRequest, match="took longer than 0.5 s"):  # the budget, and nothing else, stopped it
        render("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}")
    # CPU seconds: the 0.5 s wall-clock budget caps this thread's CPU at 0.5 s; 2^60 calls would never end.
    assert time.thread_time() - started < 3


def test_a_template_that_does_not_compile_is_a_load_error_with_a_hint() -> None:
    with pytest.raises(BadChatTemplate) as refused:
        ChatTemplate("{% for m in messages %}{{ m.content }", origin="catalog")
    assert isinstance(refused.value, ModelLoadError) and "models.toml" in (refused.value.hint or "")


def test_ordinary_templates_still_render() -> None:
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ loop.index }}/{{ loop.length }} {{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% for i in range(3) %}{{ i * 2 }}{% endfor %} {{ '%s!' % 'ok' }} {{ ns.n }}"
    )
    assert (
        render(source, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        == "1/2 user: a\n2/2 assistant: b\n024 ok! 2"
    )
    assert render(FALLBACK_TEMPLATE) == "User: hi\nAssistant:"


# --- the original reproducers, over HTTP --------------------------------------------------------


# Each reproducer answers in under a second on an idle machine and in 2-7 s with both cores saturated (busy loops,
# other test runs); the bugs they reproduce killed the server or wedged it for minutes. Their per-token costs are
# bounded in CPU time by the in-process tests above.
ANSWER_WITHIN = 120


def post(server: ServerProcess, path: str, body: dict[str, Any], expect: int) -> dict[str, Any]:
    """POST, check the status and that it came within ANSWER_WITHIN seconds, then that the server is still up."""
    started = time.monotonic()
    response = httpx.post(f"{server.url}{path}", json=body, timeout=ANSWER_WITHIN + 30)
    assert response.status_code == expect, response.text
    assert time.monotonic() - started < ANSWER_WITHIN  # a wedged server never answers; see ANSWER_WITHIN
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    return response.json()


def chat_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def test_grammar_complete_with_ignore_eos_over_every_api(server: ServerProcess) -> None:
    const = {"const": "x"}
    user = [{"role": "user", "content": "Say x."}]
    chat = post(
        server,
        "/v1/chat/completions",
        {"model": GEMMA, "messages": user, "temperature": 0, "ignore_eos": True, "response_format": chat_format(const)},
        200,
    )
    assert chat["choices"][0]["message"]["content"] == '"x"'
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a"],
            },
        },
    }
    forced = post(
        server,
        "/v1/chat/completions",
        {
            "model": GEMMA,
            "messages": user,
            "temperature": 0,
            "ignore_eos": True,
            "tool_choice": "required",
            "tools": [tool],
            "max_tokens": 40,
        },
        200,
    )
    assert forced["choices"][0]["message"]["tool_calls"]
    anthropic = post(
        server,
        "/v1/messages",
        {
            "model": GEMMA,
            "messages": user,
            "max_tokens": 20,
            "temperature": 0,
            "ignore_eos": True,
            "output_config": {"format": {"type": "json_schema", "schema": const}},
        },
        200,
    )
    assert anthropic["content"][0]["text"] == '"x"'
    responses = post(
        server,
        "/v1/responses",
        {
            "model": GEMMA,
            "input": "Say x.",
            "temperature": 0,
            "ignore_eos": True,
            "text": {"format": {"type": "json_schema", "name": "out", "schema": const}},
        },
        200,
    )
    assert responses["status"] == "completed"


def test_bias_against_the_grammar_is_a_400_naming_logit_bias(server: ServerProcess) -> None:
    """Killed the process: the bias banned every token the grammar allowed."""
    quotes = {"272": -100, "236775": -100}  # Gemma 3's two tokens that are a double quote, the only way to begin "x"
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 5,
        "logit_bias": quotes,
        "response_format": chat_format({"const": "x"}),
    }
    for temperature in (0, 0.8):
        refused = post(server, "/v1/chat/completions", {**body, "temperature": temperature}, 400)
        assert refused["error"]["param"] == "logit_bias"


def test_oversized_schemas_are_400s_naming_the_field(server: ServerProcess) -> None:
    user = [{"role": "user", "content": "x"}]
    huge_string = {"type": "string", "maxLength": 1_000_000}
    refused = post(
        server,
        "/v1/responses",
        {
            "model": GEMMA,
            "input": "x",
            "max_output_tokens": 5,
            "text": {"format": {"type": "json_schema", "name": "out", "schema": huge_string}},
        },
        400,
    )
    assert "maxLength" in refused["error"]["message"]
    post(
        server,
        "/v1/messages",
        {
            "model": GEMMA,
            "messages": user,
            "max_tokens": 5,
            "output_config": {"format": {"type": "json_schema", "schema": huge_string}},
        },
        400,
    )
    for schema in (
        {"type": "string", "minLength": 10**9},
        {"type": "string", "pattern": "^a{1000000000}$"},
        {"enum": [f"v{i}" for i in range(100_000)]},
    ):
        # (The 100,000-value enum is refused as the body is read, by the list cap, naming the enum itself.)
        assert post(
            server,
            "/v1/chat/completions",
            {"model": GEMMA, "messages": user, "max_tokens": 5, "response_format": chat_format(schema)},
            400,
        )["error"]["param"].startswith("response_format")
    deep_tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": nested_arrays(200)}}},
    }
    post(
        server,
        "/v1/chat/completions",
        {"model": GEMMA, "messages": user, "max_tokens": 5, "tool_choice": "required", "tools": [deep_tool]},
        400,
    )


def test_large_legitimate_limits_are_served(server: ServerProcess) -> None:
    user = [{"role": "user", "content": "Write a word."}]
    for schema in (
        {"type": "string", "maxLength": 20_000},
        {"type": "string", "pattern": "^a{1,100000}$"},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 18_000},
    ):
        post(
            server,
            "/v1/chat/completions",
            {
                "model": GEMMA,
                "messages": user,
                "max_tokens": 8,
                "temperature": 0,
                "response_format": chat_format(schema),
            },
            200,
        )


def test_long_prompts_are_tokenized_fast_or_refused_at_once(server: ServerProcess) -> None:
    lines = post(
        server,
        "/v1/chat/completions",
        {"model": GEMMA, "messages": [{"role": "user", "content": "x\n" * 20_000}], "max_tokens": 1},
        400,
    )
    assert lines["error"]["code"] == "context_length_exceeded"
    post(
        server,
        "/v1/chat/completions",
        {"model": GEMMA, "messages": [{"role": "user", "content": "x\n" * 2**20}], "max_tokens": 1},
        400,
    )
