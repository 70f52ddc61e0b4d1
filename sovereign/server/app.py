"""The FastAPI application: built by a factory from an engine and options, with no module globals."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from sovereign import __version__
from sovereign.engine import SamplingParams
from sovereign.engine.api import EngineAPI
from sovereign.server import anthropic_routes, chat_page, errors, extra_routes, openai_routes, responses_routes
from sovereign.server.errors import APIError
from sovereign.server.guards import DEFAULT_MAX_BODY, BodyLimit, HostGuard
from sovereign.server.observability import METRICS_CONTENT_TYPE, Metrics, RequestObserver
from sovereign.server.state import ServerState, attach

if TYPE_CHECKING:
    from sovereign.gateway import Gateway

log = logging.getLogger(__name__)
PUBLIC_PATHS = frozenset({"/", "/health"})  # and the chat page's files: the page asks for the key itself


@dataclass(frozen=True)
class ServerOptions:
    """What `sovereign serve` decides about the HTTP side."""

    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()  # models to load at start-up (and keep loaded)
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beyond this machine's own ("*": any)
    max_body: int = DEFAULT_MAX_BODY  # bytes; a larger request body is answered 413
    gateway: Gateway | None = None  # --upstream: closed APIs tried first, this server's models when they are blocked


def create_app(engine: EngineAPI, options: ServerOptions) -> FastAPI:
    """An app serving the engine's models (the real Engine, or a test double)."""
    state = ServerState(engine, default_models=options.preload)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.startup = asyncio.create_task(_preload(state, options.preload))
        try:
            yield
        finally:
            state.startup.cancel()
            if options.gateway is not None:
                await options.gateway.close()
            await engine.close()

    app = FastAPI(
        title="sovereign", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    attach(app, state)
    errors.install(app)
    if options.gateway is not None:  # innermost: behind the key check, host guard and body limit
        from sovereign.gateway import GatewayMiddleware

        app.add_middleware(GatewayMiddleware, gateway=options.gateway, engine=engine)
    if options.api_keys:
        _require_api_key(app, options.api_keys)
    if options.cors_origins:
        # Added after the key check so that it wraps it: preflight and 401s get CORS headers too.
        app.add_middleware(
            CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    # Outside the key check and CORS: a foreign Host or Origin, or an oversized body, goes no further.
    app.add_middleware(BodyLimit, limit=options.max_body)
    app.add_middleware(HostGuard, allowed_hosts=options.allowed_hosts, cors_origins=options.cors_origins)
    metrics = Metrics(engine)
    if options.gateway is not None:
        options.gateway.register(metrics.registry)
    app.add_middleware(RequestObserver, metrics=metrics)  # outermost: sees every request's final status and timing

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    page_files = chat_page.packaged_files()

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root(request: Request) -> Response:
        """The chat page for a browser; for API clients, what answers here (Claude Code checks HEAD /)."""
        if chat_page.wants_page(request):
            return chat_page.respond(request, page_files["index.html"])
        defaults = SamplingParams()
        return JSONResponse(
            {
                "name": "sovereign",
                "version": __version__,
                "apis": ["/v1/chat/completions", "/v1/messages", "/v1/responses"],
                "chat_page": "/",
                # What a request that leaves these out gets (the chat page shows them as its defaults).
                "sampling_defaults": {
                    "temperature": defaults.temperature,
                    "top_p": defaults.top_p,
                    "max_tokens": defaults.max_tokens,
                },
            }
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        loading = bool(engine.loading_names) or state.starting
        unavailable = _unavailable(engine, options.preload)
        body: dict[str, Any] = {
            "status": "loading" if loading else "degraded" if unavailable else "ok",
            "models": engine.loaded_names,
            "loading": engine.loading_names,
            "unavailable": unavailable,
        }
        if state.startup_error:
            body["error"] = state.startup_error
        if options.gateway is not None:
            body["upstreams"] = options.gateway.health()
        if workers := await engine.workers():  # serve --rpc: a worker that is away degrades the server, not /health
            body["workers"] = workers
            if body["status"] == "ok" and any(w["state"] not in ("connected", "reachable") for w in workers):
                body["status"] = "degraded"
        return JSONResponse(body, status_code=503 if loading else 200)

    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(extra_routes.router)
    app.include_router(chat_page.router(page_files))
    return app


def _unavailable(engine: EngineAPI, preload: tuple[str, ...]) -> list[dict[str, str]]:
    """The models started with or loaded whose files left the store (`sovereign rm` while serving, say).

    /health still answers 200 for them, as "degraded": the server still answers, its other models and the
    loaded copy included; taking it out of a load balancer would not bring a deleted file back.
    """
    names = dict.fromkeys([*preload, *engine.loaded_names])  # in order, once each
    return [{"model": name, "reason": reason} for name in names if (reason := engine.missing_files(name)) is not None]


async def _preload(state: ServerState, names: tuple[str, ...]) -> None:
    """Load the command line's models in the background, so /health can say 'loading' meanwhile."""
    for name in names:
        try:
            await state.engine.preload(name)
        except Exception as exc:  # noqa: BLE001 - the server stays up; requests will report the same error
            state.startup_error = f"{name}: {exc}"
            log.error("could not load %s: %s", name, exc)


def _require_api_key(app: FastAPI, keys: tuple[str, ...]) -> None:
    """Every path but /health needs `Authorization: Bearer KEY` or `x-api-key: KEY`."""
    encoded = [k.encode() for k in keys]

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if path in PUBLIC_PATHS or path.startswith(chat_page.PREFIX) or request.method == "OPTIONS":
            return await call_next(request)
        given = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        # compare_digest against every key: no early exit that leaks which key matched
        if not given or not any([secrets.compare_digest(given.encode(), key) for key in encoded]):
            message = "You didn't provide an API key." if not given else "Incorrect API key provided."
            error = APIError(
                401, message + " Pass it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.", code="invalid_api_key"
            )
            return error.response_for(request.url.path)
        return await call_next(request)
