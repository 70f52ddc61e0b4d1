"""Models, completions, embeddings, errors, API keys and CORS against the real server."""

from __future__ import annotations

import base64
import math
import re
import struct
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, InternalServerError, NotFoundError, OpenAI

from tests.conftest import GEMMA
from tests.servers import ServerProcess
from tests.test_batching import wait_until_idle


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def assert_envelope(
    response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# --- health and models ---------------------------------------------------------------


def test_health_reports_ready(server: ServerProcess) -> None:
    body = httpx.get(f"{server.url}/health").json()
    assert body["status"] == "ok" and GEMMA in body["models"]


def test_models_list_every_pulled_model(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {GEMMA, "broken:model"} <= set(models)
    gemma = models[GEMMA]
    assert gemma.object == "model" and gemma.owned_by == "sovereign" and gemma.created > 0
    assert gemma.model_extra["loaded"] is True and gemma.model_extra["quantization"] == "Q4_K_M"
    assert client.models.retrieve(GEMMA).id == GEMMA
    with pytest.raises(NotFoundError) as error:
        client.models.retrieve("no-such:model")
    assert error.value.body["code"] == "model_not_found"


# --- completions ---------------------------------------------------------------------


def test_completion_shape_and_default_budget(client: OpenAI) -> None:
    response = client.completions.create(
        model=GEMMA, prompt="The capital of France is", extra_body={"ignore_eos": True}
    )
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    (choice,) = response.choices
    assert isinstance(choice.text, str) and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 16, "OpenAI's default max_tokens for completions"


def test_completion_streamed_matches_non_streamed(client: OpenAI, server: ServerProcess) -> None:
    kwargs = {"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens > 0
    with httpx.stream(
        "POST", f"{server.base_url}/completions", json={**kwargs, "stream": True}, timeout=60
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_completion_echo_logprobs_and_prompt_forms(client: OpenAI, server: ServerProcess) -> None:
    echoed = client.completions.create(
        model=GEMMA, prompt="Hello world", max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    choice = echoed.choices[0]
    assert choice.text.startswith("Hello world")
    lp = choice.logprobs
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == len(lp.text_offset)
        == echoed.usage.completion_tokens
    )
    assert lp.text_offset[0] == len("Hello world")
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    tokens = httpx.post(f"{server.url}/tokenize", json={"content": "Hello world"}).json()["tokens"]
    by_ids = client.completions.create(model=GEMMA, prompt=tokens, max_tokens=3, temperature=0)
    by_text = client.completions.create(model=GEMMA, prompt="Hello world", max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    several = client.completions.create(model=GEMMA, prompt=["One", "Two"], max_tokens=2, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_completion_rejects_unsupported_options(client: OpenAI) -> None:
    for options in ({"suffix": "x"}, {"best_of": 3}):
        with pytest.raises(BadRequestError) as error:
            client.completions.create(model=GEMMA, prompt="x", max_tokens=1, **options)
        assert error.value.body["param"] == next(iter(options))


# --- embeddings ----------------------------------------------------------------------


def test_embeddings_float_and_base64(client: OpenAI, server: ServerProcess) -> None:
    # The SDK asks for base64 by default and decodes it.
    response = client.embeddings.create(model=GEMMA, input=["the sea", "the ocean", "tax law"])
    vectors = [d.embedding for d in response.data]
    assert [d.index for d in response.data] == [0, 1, 2] and response.usage.prompt_tokens > 3
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) == 640
    assert all(abs(math.fsum(x * x for x in v) - 1) < 1e-3 for v in vectors), "unit length"
    raw = httpx.post(
        f"{server.base_url}/embeddings", json={"model": GEMMA, "input": "the sea", "encoding_format": "float"}
    ).json()
    assert raw["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-5)
    packed = httpx.post(
        f"{server.base_url}/embeddings", json={"model": GEMMA, "input": "the sea", "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack("<640f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(vectors[0], abs=1e-5)
    single = client.embeddings.create(model=GEMMA, input="the sea", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[2], abs=1e-3)


def test_embedding_errors(server: ServerProcess) -> None:
    url = f"{server.base_url}/embeddings"
    assert_envelope(httpx.post(url, json={"model": GEMMA, "input": []}), 400, param="input")
    assert_envelope(httpx.post(url, json={"model": GEMMA, "input": ""}), 400, param="input")
    assert_envelope(httpx.post(url, json={"model": "nope", "input": "x"}), 404, code="model_not_found")
    assert_envelope(
        httpx.post(url, json={"model": GEMMA, "input": "x", "encoding_format": "int8"}), 400, param="encoding_format"
    )


def test_embedding_token_ids_must_be_the_models_own(server: ServerProcess) -> None:
    """LangChain's OpenAIEmbeddings sends tiktoken's cl100k ids: read as Gemma's they would embed unrelated text."""
    url = f"{server.base_url}/embeddings"
    own = httpx.post(f"{server.url}/tokenize", json={"model": GEMMA, "content": "the sea at night"}).json()["tokens"]
    by_ids = httpx.post(url, json={"model": GEMMA, "input": [own], "encoding_format": "float"}).json()["data"][0][
        "embedding"
    ]
    by_text = httpx.post(url, json={"model": GEMMA, "input": "the sea at night", "encoding_format": "float"}).json()[
        "data"
    ][0]["embedding"]
    assert by_ids == pytest.approx(by_text, abs=1e-5)
    cl100k = [1820, 9581, 520, 3814]  # "the sea at night" in tiktoken's cl100k_base
    refused = httpx.post(url, json={"model": GEMMA, "input": [cl100k]})
    assert_envelope(refused, 400, param="input")
    assert "check_embedding_ctx_length=False" in refused.json()["error"]["message"]


# --- errors --------------------------------------------------------------------------


def test_unknown_model_is_404_everywhere(client: OpenAI) -> None:
    calls = [
        lambda: client.chat.completions.create(model="nope:1b", messages=[{"role": "user", "content": "hi"}]),
        lambda: client.completions.create(model="nope:1b", prompt="hi"),
        lambda: client.embeddings.create(model="nope:1b", input="hi"),
        lambda: client.chat.completions.create(model="../../etc/passwd", messages=[{"role": "user", "content": "hi"}]),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as error:
            call()
        assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"


def test_prompt_too_long_is_context_length_exceeded(server: ServerProcess) -> None:
    body = {"model": GEMMA, "messages": [{"role": "user", "content": "word " * 40_000}]}  # past the default 32k context
    error = assert_envelope(
        httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60), 400, code="context_length_exceeded"
    )
    limit, given = (int(n) for n in re.findall(r"(\d+) tokens", error["message"]))
    assert 8192 <= limit < given and given > 40_000, "both token counts are given"
    streamed = assert_envelope(
        httpx.post(f"{server.base_url}/chat/completions", json={**body, "stream": True}, timeout=60),
        400,
        code="context_length_exceeded",
    )
    assert streamed["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            "temperature",
            "invalid_type",
        ),
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
            "temperature",
            "invalid_value",
        ),
        ({"model": GEMMA, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "invalid_value"),
        ({"model": GEMMA}, "messages", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1},
            "frobnicate",
            "unknown_parameter",
        ),
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "functions": []},
            "functions",
            "unknown_parameter",
        ),
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
            "invalid_value",
        ),
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            "tool_choice",
            "invalid_value",
        ),
        (
            {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999999": 5}},
            "logit_bias",
            "invalid_value",
        ),
        (
            {
                "model": GEMMA,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"$ref": "https://evil.example/s.json"}}},
                    },
                },
            },
            "response_format",
            "invalid_value",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(server: ServerProcess, body: dict, param: str, code: str) -> None:
    error = assert_envelope(
        httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60), 400, code=code, param=param
    )
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"] or code in (
        "invalid_type",
        "invalid_value",
        "missing_required_parameter",
    )


def test_malformed_json_is_400(server: ServerProcess) -> None:
    for raw in (b"{not json", b"[1, 2]", b""):
        response = httpx.post(
            f"{server.base_url}/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert_envelope(response, 400)


def test_unknown_route_and_method_use_the_envelope(server: ServerProcess) -> None:
    assert_envelope(httpx.get(f"{server.base_url}/nothing-here"), 404)
    assert_envelope(httpx.get(f"{server.base_url}/chat/completions"), 405)


def test_a_model_that_cannot_load_is_a_clear_error_and_the_server_survives(client: OpenAI) -> None:
    with pytest.raises(InternalServerError) as error:
        client.chat.completions.create(model="broken:model", messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["code"] == "model_load_failed" and "could not" in error.value.body["message"]
    assert client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).choices


def test_server_keeps_serving_after_disconnects_and_bad_requests(server: ServerProcess, client: OpenAI) -> None:
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": 4000,  # a stream left running would hold its slot for 40 s or more (~100 tokens/s here)
        "stream": True,
        "ignore_eos": True,
    }
    for _ in range(3):  # walk away mid-stream
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
            for _line in response.iter_lines():
                break
    httpx.post(f"{server.base_url}/chat/completions", content=b"{", headers={"content-type": "application/json"})
    # The abandoned streams' slots are free again: in milliseconds (a second or two on a saturated machine),
    # far within the 10 s allowed and the 40 s a stream that kept generating would hold one.
    wait_until_idle(server, within=10.0)
    short = client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert short.choices and short.usage.completion_tokens >= 1
    assert client.models.list().data


# --- API keys and CORS --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(real_model_home: Path) -> ServerProcess:
    with ServerProcess(
        real_model_home, GEMMA, "--api-key", "s3cret", "--cors-origin", "https://app.example"
    ) as running:
        yield running


def test_api_key_is_required_except_for_health(guarded_server: ServerProcess) -> None:
    base = guarded_server.base_url
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200
    assert_envelope(httpx.get(f"{base}/models"), 401, code="invalid_api_key")
    assert_envelope(httpx.get(f"{base}/models", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert httpx.get(f"{base}/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{base}/models", headers={"x-api-key": "s3cret"}).status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    good = OpenAI(base_url=base, api_key="s3cret", max_retries=0)
    assert good.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices


def test_cors_only_for_the_named_origin(guarded_server: ServerProcess, server: ServerProcess) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(f"{guarded_server.base_url}/chat/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{guarded_server.base_url}/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert other.headers.get("access-control-allow-origin") is None
    plain = httpx.get(f"{server.base_url}/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers, "no CORS unless asked"
