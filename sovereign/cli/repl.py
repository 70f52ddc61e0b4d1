"""`sovereign run`: one streamed answer, or an interactive chat in the terminal like `ollama run`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from sovereign.engine import (
    ChatRequest,
    Engine,
    Finished,
    ModelPool,
    SamplingParams,
    TextDelta,
)

HELP = "Commands: /clear forgets the conversation, /bye (or Ctrl-D) quits; Ctrl-C stops an answer."


async def answer(engine: Engine, request: ChatRequest, out: TextIO) -> tuple[str, Finished | None]:
    """Stream one reply to `out`; returns its text and how it ended."""
    generation = await engine.submit(request)
    text, finished = "", None
    try:
        async for event in generation:
            if isinstance(event, TextDelta):
                text += event.text
                out.write(event.text)
                out.flush()
            elif isinstance(event, Finished):
                finished = event
    finally:
        await generation.cancel()
    return text, finished


class ChatSession:
    """A conversation with one model, kept across turns."""

    def __init__(self, pool: ModelPool, model: str, sampling: SamplingParams, system: str | None = None) -> None:
        self.engine = Engine(pool)
        self.pool = pool
        self.model = model
        self.sampling = sampling
        self.system = system
        self.history: list[dict[str, Any]] = []

    def clear(self) -> None:
        self.history = []

    def request_for(self, prompt: str) -> ChatRequest:
        start = [{"role": "system", "content": self.system}] if self.system else []
        return ChatRequest(self.model, [*start, *self.history, {"role": "user", "content": prompt}], self.sampling)

    async def turn(self, prompt: str, out: TextIO) -> str:
        """Ask, stream the answer, and remember both (an interrupted answer is remembered as far as it got)."""
        text = ""
        try:
            text, _ = await answer(self.engine, self.request_for(prompt), out)
        finally:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return text


def run_once(pool: ModelPool, model: str, prompt: str, sampling: SamplingParams, system: str | None) -> None:
    """Print one streamed answer to stdout."""

    async def main() -> None:
        try:
            session = ChatSession(pool, model, sampling, system)
            await session.turn(prompt, sys.stdout)
            sys.stdout.write("\n")
        finally:
            await pool.close()

    asyncio.run(main())


def run_interactive(pool: ModelPool, model: str, sampling: SamplingParams, system: str | None, err: Any) -> None:
    """A read-answer loop on the terminal, with /bye and /clear."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    session = ChatSession(pool, model, sampling, system)
    err.print(f"[dim]chatting with {model}. {HELP}[/]", highlight=False)
    loop.run_until_complete(pool.get(model, pin=True))
    try:
        while True:
            try:
                prompt = input(">>> ")
            except EOFError:
                sys.stdout.write("\n")
                break
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                continue
            command = prompt.strip()
            if not command:
                continue
            if command in ("/bye", "/exit", "/quit"):
                break
            if command == "/clear":
                session.clear()
                err.print("[dim]conversation cleared[/]")
                continue
            if command in ("/?", "/help"):
                err.print(f"[dim]{HELP}[/]", highlight=False)
                continue
            if command.startswith("/"):
                err.print(f"[yellow]unknown command {command.split()[0]}[/] [dim]— {HELP}[/]", highlight=False)
                continue
            task = loop.create_task(session.turn(prompt, sys.stdout))
            try:
                loop.run_until_complete(task)
            except KeyboardInterrupt:
                task.cancel()
                try:
                    loop.run_until_complete(task)
                except (asyncio.CancelledError, KeyboardInterrupt):
                    pass
                err.print("\n[dim](stopped)[/]")
            sys.stdout.write("\n\n")
            sys.stdout.flush()
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
