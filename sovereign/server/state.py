"""What the app keeps on `app.state`, behind typed accessors (routes never reach for attributes by name)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import FastAPI, Request

from sovereign.engine.api import EngineAPI
from sovereign.server.errors import APIError


@dataclass
class ServerState:
    """The app's collaborators and start-up progress."""

    engine: EngineAPI
    default_models: tuple[str, ...] = ()
    startup: asyncio.Task[None] | None = None
    startup_error: str | None = None

    @property
    def starting(self) -> bool:
        """Whether the command line's models are still loading."""
        return self.startup is not None and not self.startup.done()


def attach(app: FastAPI, state: ServerState) -> None:
    """Hang the state on the app (once, in the factory)."""
    app.state.sovereign = state


def server_state(source: Request | FastAPI) -> ServerState:
    """The state of the app serving a request (or of an app)."""
    app = source.app if isinstance(source, Request) else source
    state: ServerState = app.state.sovereign
    return state


def engine(request: Request) -> EngineAPI:
    """The engine behind the app serving a request."""
    return server_state(request).engine


def model_name(request: Request, given: str | None) -> str:
    """The model a request names, else the first one the server was started with."""
    name = given or next(iter(server_state(request).default_models), None)
    if name is None:
        raise APIError(400, "Name a model.", param="model", code="missing_required_parameter")
    return name
