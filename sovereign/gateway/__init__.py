"""The gateway: forward API requests to a closed upstream while it answers, fall back to a local model when it is blocked."""

from sovereign.gateway.circuit import Circuit
from sovereign.gateway.proxy import Gateway, GatewayMiddleware
from sovereign.gateway.upstream import CAUSES, Upstream, parse_upstream

__all__ = ["CAUSES", "Circuit", "Gateway", "GatewayMiddleware", "Upstream", "parse_upstream"]
