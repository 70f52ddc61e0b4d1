"""The gateway: forward API requests to a closed upstream while it answers.

It falls back to a local model when the upstream is blocked.

Its names load on first use (PEP 562): the HTTP client it forwards through (aiohttp) takes ~200 ms
to import, which a server without --upstream should not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sovereign.gateway.circuit import Circuit
    from sovereign.gateway.proxy import Gateway, GatewayMiddleware
    from sovereign.gateway.upstream import CAUSES, Upstream, parse_upstream

_LAZY = {
    "Circuit": "sovereign.gateway.circuit",
    "Gateway": "sovereign.gateway.proxy",
    "GatewayMiddleware": "sovereign.gateway.proxy",
    "CAUSES": "sovereign.gateway.upstream",
    "Upstream": "sovereign.gateway.upstream",
    "parse_upstream": "sovereign.gateway.upstream",
}
__all__ = ["CAUSES", "Circuit", "Gateway", "GatewayMiddleware", "Upstream", "parse_upstream"]


def __getattr__(name: str) -> Any:
    """The gateway's names, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
