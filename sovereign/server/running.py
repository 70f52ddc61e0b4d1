"""Running generations for an HTTP request: to the end, or until the client hangs up."""

from __future__ import annotations

import asyncio

from fastapi import Request

from sovereign.engine import Generation
from sovereign.server import openai_convert as convert


async def collect(request: Request, generations: list[Generation]) -> list[convert.ChoiceResult]:
    """Run every choice to its end, or stop them all as soon as the client hangs up."""

    async def one(generation: Generation) -> convert.ChoiceResult:
        result = convert.ChoiceResult()
        async for event in generation:
            result.add(event)
        return result

    watcher = asyncio.create_task(cancel_on_disconnect(request, generations))
    try:
        return list(await asyncio.gather(*(one(g) for g in generations)))
    finally:
        watcher.cancel()
        for generation in generations:
            await generation.cancel()


async def cancel_on_disconnect(request: Request, generations: list[Generation]) -> None:
    """Wait for the client to go away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for generation in generations:
        generation.stop()
