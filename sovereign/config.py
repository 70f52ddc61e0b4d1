"""Settings: every knob sovereign reads from the environment, built once and passed down."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from sovereign.errors import SovereignError

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_MAX_QUEUE = 512  # requests waiting for a slot before 503, as Ollama's OLLAMA_MAX_QUEUE
DEFAULT_TIMEOUT = 600.0  # seconds per request: the OpenAI and Anthropic SDKs give up (and retry) after this long anyway
# Agents send long prompts (Claude Code's system prompt and tools are ~20k tokens): the default context
# is at least this much, where the model was trained for it and memory holds it.
AGENT_CONTEXT = 32768


def _describe(text: str, env: str) -> dict[str, str]:
    """Field metadata: the environment variable and what it means (shown by `sovereign env`)."""
    return {"env": env, "help": text}


def _default_home() -> Path:
    """The platform's per-user data directory, e.g. ~/.local/share/sovereign on Linux."""
    import platformdirs  # imported here so that merely importing config stays cheap

    return Path(platformdirs.user_data_dir("sovereign", appauthor=False))


def _int_setting(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SovereignError(
            f"{name}={raw!r} is not a whole number", f"set {name} to a number of bytes or unset it"
        ) from None


def _extra_buffers(env: Mapping[str, str]) -> str:
    """SOVEREIGN_EXTRA_BUFFERS, checked here so that a typo fails at start, not at the first model load."""
    value = (env.get("SOVEREIGN_EXTRA_BUFFERS") or "auto").strip().lower()
    if value not in ("auto", "on", "off"):
        raise SovereignError(
            f"SOVEREIGN_EXTRA_BUFFERS={value!r} is not one of auto, on, off", "unset it, or set it to auto"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """Everything sovereign reads from its environment."""

    home: Path = field(metadata=_describe("Root of the model store and user catalog.", "SOVEREIGN_HOME"))
    hf_endpoint: str = field(
        default=DEFAULT_HF_ENDPOINT,
        metadata=_describe("Hugging Face endpoint tried first (the standard huggingface-hub variable).", "HF_ENDPOINT"),
    )
    hf_mirrors: tuple[str, ...] = field(
        default=(),
        metadata=_describe(
            "Comma-separated Hugging Face mirrors tried in order after HF_ENDPOINT.", "SOVEREIGN_HF_MIRRORS"
        ),
    )
    hf_token: str | None = field(
        default=None, metadata=_describe("Token for gated or private Hugging Face repositories.", "HF_TOKEN")
    )
    allow_http: bool = field(
        default=False,
        metadata=_describe("Allow plain-http model URLs beyond loopback (1/true).", "SOVEREIGN_ALLOW_HTTP"),
    )
    min_free_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_describe("Free space a pull must leave on the store's disk, in bytes.", "SOVEREIGN_MIN_FREE_BYTES"),
    )
    extra_buffers: str = field(
        default="auto",
        metadata=_describe(
            "Expert override for llama.cpp's repacked CPU kernels: auto (proved once per machine, off if they crash),"
            " on or off.",
            "SOVEREIGN_EXTRA_BUFFERS",
        ),
    )

    rpc_timeout: int = field(
        default=120,
        metadata=_describe(
            "Seconds a model split over RPC workers (serve --rpc) waits on a silent worker before failing its"
            " requests; raise it for slow workers on long prompts.",
            "SOVEREIGN_RPC_TIMEOUT",
        ),
    )

    @property
    def prompt_cache_dir(self) -> Path:
        """Where the prompt cache's disk tier keeps its files (a folder per model and llama.cpp build)."""
        return self.home / "cache" / "prompts"

    @property
    def user_catalog(self) -> Path:
        """The user's own models.toml, which extends and overrides the built-in catalog."""
        return self.home / "models.toml"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables (os.environ unless given)."""
        env = os.environ if environ is None else environ
        home = env.get("SOVEREIGN_HOME")
        mirrors = tuple(m.strip().rstrip("/") for m in env.get("SOVEREIGN_HF_MIRRORS", "").split(",") if m.strip())
        return cls(
            home=Path(home).expanduser() if home else _default_home(),
            hf_endpoint=(env.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/"),
            hf_mirrors=mirrors,
            hf_token=env.get("HF_TOKEN") or None,
            allow_http=env.get("SOVEREIGN_ALLOW_HTTP", "").lower() in {"1", "true", "yes"},
            min_free_bytes=_int_setting(env, "SOVEREIGN_MIN_FREE_BYTES", 256 * 1024 * 1024),
            extra_buffers=_extra_buffers(env),
            rpc_timeout=max(1, _int_setting(env, "SOVEREIGN_RPC_TIMEOUT", 120)),
        )

    @classmethod
    def describe(cls) -> list[Variable]:
        """Every environment variable sovereign reads: these settings' first, then those read where they are used."""
        own = [Variable(f.metadata["env"], f.metadata["help"], secret=f.name == "hf_token") for f in fields(cls)]
        return own + list(OTHER_VARIABLES)


@dataclass(frozen=True)
class Variable:
    """An environment variable sovereign reads, and what it means (`sovereign env` lists them)."""

    name: str
    meaning: str
    secret: bool = False  # shown as set or unset, never its value

    def shown(self, environ: Mapping[str, str]) -> str | None:
        """Its value as `sovereign env` prints it: None when unset, a secret hidden, a URL's credentials too."""
        value = environ.get(self.name)
        if value is None:
            return None
        return "(set, hidden)" if self.secret else _URL_CREDENTIALS.sub("://***@", value)


# user:password@ (or token@) in a URL, as a mirror's URL may carry it.
_URL_CREDENTIALS = re.compile(r"://[^/@\s]+@")

# Variables read where they are used rather than through Settings: the log level before anything else runs,
# a server's own options, the downloader's tuning, the gateway's keys, and other tools' folders for `adopt`.
OTHER_VARIABLES = (
    Variable("SOVEREIGN_API_KEY", "The key `serve` requires (same as --api-key).", secret=True),
    Variable(
        "SOVEREIGN_LOG_LEVEL",
        "INFO or DEBUG to see llama.cpp's own log (default WARNING); ERROR also hides the request lines of `serve`.",
    ),
    Variable(
        "SOVEREIGN_DOWNLOAD_CONNECTIONS",
        "Concurrent HTTP range requests per large download (default 8; 1 for a single stream).",
    ),
    Variable(
        "SOVEREIGN_UPSTREAM_KEY_ANTHROPIC",
        "With serve --upstream anthropic=URL: the key sent upstream in place of the client's.",
        secret=True,
    ),
    Variable(
        "SOVEREIGN_UPSTREAM_KEY_OPENAI",
        "With serve --upstream openai=URL: the key sent upstream in place of the client's.",
        secret=True,
    ),
    Variable("OLLAMA_MODELS", "Where `adopt` looks for Ollama's models (default ~/.ollama/models)."),
    Variable("HF_HUB_CACHE", "Where `adopt` looks for the Hugging Face cache (default $HF_HOME/hub)."),
    Variable("HF_HOME", "The Hugging Face home, for `adopt` (default ~/.cache/huggingface)."),
    Variable("LLAMA_CACHE", "Where `adopt` looks for llama.cpp's downloads (default ~/.cache/llama.cpp)."),
    Variable("OPENAI_API_KEY", "The key `bench --url` sends (same as its --api-key).", secret=True),
)
