"""What every command shares: its collaborators (Core), the two consoles, and errors turned into one red line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sovereign.catalog import Catalog, load_catalog
from sovereign.config import Settings
from sovereign.errors import SovereignError
from sovereign.refs import ModelName, parse_name

# No emoji codes: a name such as a:b:c must print as typed, not as "a🅱c".
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turn our errors into one line plus a hint and a non-zero exit; Ctrl-C into a resume hint."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SovereignError as exc:
            # Messages quote what the user typed: '[' there is text, not markup (and '[/x]' would crash rich).
            hint = f" [dim]— {escape(exc.hint)}[/]" if exc.hint else ""
            err.print(f"[bold red]error:[/] {escape(exc.message)}{hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            # The file system said no (permissions, a full disk, a read-only home): say where.
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(
                (
                    f"[bold red]error:[/] {escape(str(exc.strerror or exc) + where)} [dim]— check permissions and free "
                    "space, or set SOVEREIGN_HOME[/]"
                ),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/] — run the same command again to resume", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class Core:
    """The collaborators a command needs, built once from the environment."""

    def __init__(self) -> None:
        from sovereign.store import Store

        self.settings = Settings.from_env()
        self.store = Store(self.settings.home)
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        """The merged catalog (loaded on first use so `list` stays fast)."""
        if self._catalog is None:
            self._catalog = load_catalog(self.settings)
        return self._catalog

    def resolve_name(self, text: str) -> ModelName:
        """A store name, following catalog aliases."""
        name = parse_name(text)
        return self.catalog.canonical(name) if self.store.get(name) is None else name
