"""The one exception tree of sovereign.

Every error a user can cause or meet carries a message (what is wrong) and a hint
(what to do about it). The CLI renders both as one line; the HTTP layer maps each
class to a status code and OpenAI's error envelope.

    SovereignError
    ├── InvalidReference          a model reference or name that cannot be parsed or escapes the store
    ├── CatalogError              a models.toml that cannot be read
    ├── ModelNotFound             a name that is neither in the catalog nor in the store
    ├── StoreError                the store on disk is damaged or cannot be written
    │   └── BundleError           a bundle that cannot be written, or read back whole and unchanged
    ├── PullError                 a pull that did not produce a model
    │   ├── SourceUnavailable     a source that could not be reached or does not have the file
    │   ├── AccessDenied          a source that refused us (gated repository, bad token)
    │   ├── IntegrityError        bytes whose sha256 or size is not what was promised
    │   ├── NotGGUF               a file that is not a GGUF model
    │   ├── InsecureSource        a source refused by policy (plain http beyond loopback)
    │   ├── InsufficientDisk      not enough free space for the download
    │   └── AllSourcesFailed      every source of a pull failed; carries each failure
    ├── BenchError                a benchmark that cannot run as asked
    ├── BadUpstream               an --upstream value that is not KIND=URL
    ├── BadRoute                  an --alias or --route value that is not GLOB=MODEL
    └── EngineError               inference could not run
        ├── ModelLoadError        a model file llama.cpp cannot load (corrupt, too big for memory)
        │   └── BadChatTemplate   a model whose chat template (its own or the catalog's) does not compile
        ├── ModelCrashed          a model's process died (a signal) while serving
        ├── WorkerUnavailable     an RPC worker holding part of a model is unreachable or of another build
        ├── InvalidRequest        a request the engine cannot honour (bad schema, bad parameter)
        ├── ContextLengthExceeded a prompt longer than the model's context
        ├── ServerBusy            every slot busy and the queue full (HTTP 503 with Retry-After)
        └── RequestTimedOut       a request that ran past the server's --timeout

tests/test_layout.py checks that this drawing names every class below SovereignError, under its parent.
"""

from __future__ import annotations


class SovereignError(Exception):
    """Base of every error sovereign raises on purpose."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidReference(SovereignError):
    """A model reference or name that cannot be parsed or would escape the store."""


class CatalogError(SovereignError):
    """A models.toml that cannot be read or is malformed."""


class ModelNotFound(SovereignError):
    """A model name that is neither in the catalog nor in the store."""


class StoreError(SovereignError):
    """The model store on disk is damaged or cannot be written."""


class BundleError(StoreError):
    """A bundle that cannot be written, or read back whole and unchanged."""


class PullError(SovereignError):
    """A pull that did not produce a usable model."""


class SourceUnavailable(PullError):
    """A source that could not be reached or does not have the file."""


class AccessDenied(PullError):
    """A source that refused access (gated repository, missing or wrong token)."""


class IntegrityError(PullError):
    """Downloaded bytes whose sha256 or size is not what was promised."""


class NotGGUF(PullError):
    """A file that is not a GGUF model."""


class InsecureSource(PullError):
    """A source refused by policy: plain http beyond loopback, or a scheme other than http(s)."""


class InsufficientDisk(PullError):
    """Not enough free disk space for a download."""


class AllSourcesFailed(PullError):
    """Every source of a pull failed; `failures` holds each source's error in order."""

    def __init__(self, message: str, hint: str | None, failures: list[tuple[str, PullError]]) -> None:
        super().__init__(message, hint)
        self.failures = failures


class BenchError(SovereignError):
    """A benchmark that cannot run as asked: a bad option, an unreadable prompts file, an unreachable server."""


class BadUpstream(SovereignError):
    """An --upstream value that is not KIND=URL."""


class BadRoute(SovereignError):
    """A --alias or --route value that is not GLOB=MODEL."""


class EngineError(SovereignError):
    """Inference could not run."""


class ModelLoadError(EngineError):
    """A model that llama.cpp could not load: a corrupt file, or not enough memory."""


class BadChatTemplate(ModelLoadError):
    """A model whose chat template, its own or the catalog's, does not compile; the hint says where to fix it."""


class ModelCrashed(EngineError):
    """A model's process died while serving; `signal` names how (SIGSEGV, SIGILL, SIGABRT…)."""

    def __init__(self, model: str, signal: str) -> None:
        super().__init__(
            f"the model {model} crashed ({signal}) while serving this request", "send it again: the model is reloaded"
        )
        self.model = model
        self.signal = signal

    @staticmethod
    def advice(signal: str) -> str:
        """What a user can try after a crash of this kind."""
        if signal == "SIGILL":
            return "This CPU refused an instruction of llama.cpp's kernels: try SOVEREIGN_EXTRA_BUFFERS=off."
        if signal in ("SIGKILL", "exit status -9"):
            return "It was killed, often by the out-of-memory killer: try a smaller --ctx or --parallel."
        return "If it happens again, try a smaller --ctx or --parallel and report it with the model and request."


class WorkerUnavailable(EngineError):
    """An RPC worker (`serve --rpc`) that holds part of the model is unreachable, or runs another llama.cpp build."""

    def __init__(self, worker: str, reason: str, hint: str | None = None) -> None:
        super().__init__(
            f"the RPC worker {worker} {reason}",
            hint or "start `sovereign worker` there again: the next request reloads the model",
        )
        self.worker = worker
        self.reason = reason


class InvalidRequest(EngineError):
    """A request the engine cannot honour; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


class ContextLengthExceeded(EngineError):
    """A prompt that does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"this model's context is {n_ctx} tokens, but the prompt has {prompt_tokens} tokens",
            "shorten the prompt or start the server with a larger --ctx",
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class ServerBusy(EngineError):
    """Every slot is busy and the waiting queue is full: try again after `retry_after` seconds."""

    def __init__(self, queued: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: every slot is generating and {queued} requests are already waiting",
            f"retry after {retry_after} s, or start the server with a larger --max-queue or --parallel",
        )
        self.queued = queued
        self.retry_after = retry_after


class RequestTimedOut(EngineError):
    """A request ran past the server's per-request time limit and was stopped."""

    def __init__(self, limit: float) -> None:
        super().__init__(
            f"the request did not finish within the server's {limit:g} s limit and was stopped",
            "ask for fewer tokens, or start the server with a larger --timeout",
        )
        self.limit = limit
