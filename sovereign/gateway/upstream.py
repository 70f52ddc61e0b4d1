"""Upstream APIs (`--upstream anthropic=URL`), which requests go to which, and which failures mean "blocked"."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from sovereign.errors import BadUpstream

KINDS = ("anthropic", "openai")
# What counts as the upstream being blocked (and so falls back), each switchable off with --no-fallback-on.
CAUSES = ("connect", "dns", "tls", "timeout", "451", "403")
# Paths each kind of upstream serves (the rest is always local: tokenize, apply-template, metrics, ...).
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models")


@dataclass(frozen=True)
class Upstream:
    """One closed API: its kind, base URL (OpenAI's ends in /v1, Anthropic's is the root) and optional own key."""

    kind: str
    base_url: str
    key: str | None = None  # SOVEREIGN_UPSTREAM_KEY_<KIND>: replaces the client's credentials when set

    def url_for(self, path: str, query: bytes) -> str:
        """The upstream URL for one of our API paths."""
        base = self.base_url.rstrip("/")
        if self.kind == "openai":  # its base already ends in /v1
            path = path.removeprefix("/v1") if base.endswith("/v1") else path
        return base + path + (f"?{query.decode('latin-1')}" if query else "")

    def probe_url(self) -> str:
        """A cheap GET that any live API answers (with 200, or 401 without a key)."""
        return self.url_for("/v1/models", b"")

    def auth_headers(self) -> dict[str, str]:
        """The configured key, as this kind of API takes it."""
        if self.key is None:
            return {}
        return {"x-api-key": self.key} if self.kind == "anthropic" else {"authorization": f"Bearer {self.key}"}


def parse_upstream(text: str, environ: dict[str, str] | None = None) -> Upstream:
    """'anthropic=https://api.anthropic.com' as an Upstream; BadUpstream otherwise."""
    kind, sep, url = (part.strip() for part in text.partition("="))
    if not sep or kind not in KINDS:
        raise BadUpstream(
            f"--upstream {text!r} is not KIND=URL with KIND one of {', '.join(KINDS)}",
            "for example: --upstream anthropic=https://api.anthropic.com",
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadUpstream(
            f"--upstream {text!r}: {url!r} is not an http(s) URL",
            "for example: --upstream openai=https://api.openai.com/v1",
        )
    env = os.environ if environ is None else environ
    return Upstream(kind, url, env.get(f"SOVEREIGN_UPSTREAM_KEY_{kind.upper()}") or None)


def kind_of(path: str, headers: dict[str, str]) -> str | None:
    """Which kind of upstream a request path belongs to (an Anthropic client's /v1/models goes to Anthropic)."""
    if path in ANTHROPIC_PATHS:
        return "anthropic"
    if path == "/v1/models" and "anthropic-version" in headers:
        return "anthropic"
    if path in OPENAI_PATHS:
        return "openai"
    return None


def blocked_cause(error: BaseException) -> str | None:
    """Why a request that got no answer means the upstream is blocked: connect, dns, tls, timeout; or None.

    Read from aiohttp's typed errors.
    """
    import aiohttp  # loaded already: the error came from it

    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return "tls"
    if isinstance(
        error, (aiohttp.ClientConnectionError, ConnectionError)
    ):  # after DNS and TLS: their classes derive from it
        return "connect"  # refused, reset or cut before the answer began
    return None
