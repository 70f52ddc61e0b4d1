"""Running generations for an HTTP request: to the end, or until the client hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from sovereign.engine import Generation
from sovereign.server import openai_convert as convert
from sovereign.server.errors import APIError, from_exception

T = TypeVar("T")


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


async def client_gone(request: Request) -> None:
    """Return once the client goes away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, generations: list[Generation]) -> None:
    """Stop the generations once the client goes away."""
    await client_gone(request)
    for generation in generations:
        generation.stop()


async def with_heartbeat(events: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """The events, and None each time `interval` seconds pass without one.

    For keep-alive frames during a long prefill.
    """
    iterator = aiter(events)
    pending: asyncio.Future[T] = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(iterator))
    finally:
        await _close(iterator, pending)


async def _close(iterator: AsyncIterator[T], pending: asyncio.Future[T]) -> None:
    """Close the events, first stopping the step in flight: a client that left is not an error."""
    pending.add_done_callback(_retrieve)  # however it ends, no one else will read it
    if not pending.done():
        # The generator is running inside `pending` (a long prefill): aclose() now would raise "already
        # running". Cancelling the step ends the generator where it waits, its own clean-up included.
        pending.cancel()
        await asyncio.wait({pending})
    if hasattr(iterator, "aclose"):  # its own clean-up now, not when it is collected
        await iterator.aclose()


def _retrieve(step: asyncio.Future[Any]) -> None:
    """Read a finished step's outcome, so asyncio does not log it as never retrieved."""
    if not step.cancelled():
        step.exception()


def event_stream(
    frames: AsyncIterator[bytes],
    generations: list[Generation],
    *,
    error_frame: Callable[[APIError], bytes] | None = None,
    last: bytes = b"",
) -> StreamingResponse:
    """A server-sent-events response that stops its generations when it ends or the client goes away.

    Once the status line is out, an error can only travel in-band: `error_frame` renders it in the
    API's own form; `last` closes every stream that was not cut off (OpenAI's `[DONE]`).
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for frame in frames:
                yield frame
        except Exception as exc:
            if error_frame is None:
                raise
            yield error_frame(from_exception(exc))
        finally:
            for generation in generations:
                await generation.cancel()
        if last:
            yield last

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it as soon as the client hangs up (the body is already read).

    For a request answered all at once: without this, work whose client left runs on to its end.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        await client_gone(request)
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()
        task.cancel()
