"""Which `sovereign serve` processes on this machine serve which models from a store, so that `rm` can warn.

Each server keeps two small files under <home>/servers: a lock it holds while it runs, and a JSON record of its
address and the models it serves (those named on its command line and those loaded), rewritten as that changes.
Both go at exit. A record whose lock can be taken belongs to a server that died without removing it (SIGKILL, a
power cut): it is ignored and deleted. The lock, not the pid, tells: a pid can be reused, a lock dies with its
holder, on every platform.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningServer:
    """A `sovereign serve` process and the models it serves."""

    pid: int
    url: str
    models: tuple[str, ...]


def _folder(home: Path) -> Path:
    return home / "servers"


class ServingRecord:
    """This server's own record: held while it runs, rewritten as what it serves changes, removed by close()."""

    def __init__(self, home: Path, url: str) -> None:
        stem = f"{os.getpid()}-{secrets.token_hex(4)}"  # unique: no other process ever takes this lock
        self.path = _folder(home) / f"{stem}.json"
        self.url = url
        self._lock = FileLock(_folder(home) / f"{stem}.lock")
        self._closed = False

    def write(self, models: Iterable[str]) -> None:
        """Record the models served now (atomically: a reader sees the old record or the new one)."""
        if self._closed:  # a model unloaded as the server stops: no record to bring back
            return
        try:
            if not self._lock.is_locked:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock.acquire()
            partial = self.path.with_suffix(".partial")
            body = {"pid": os.getpid(), "url": self.url, "models": sorted(set(models))}
            partial.write_text(json.dumps(body), encoding="utf-8")
            os.replace(partial, self.path)
        except OSError as exc:  # serving goes on: only `rm`'s warning is lost
            log.warning("could not record the models served in %s: %s", self.path.parent, exc)

    def close(self) -> None:
        """Remove the record: this server serves nothing any more."""
        self._closed = True
        self.path.unlink(missing_ok=True)
        if self._lock.is_locked:
            self._lock.release()
            Path(self._lock.lock_file).unlink(missing_ok=True)


def running_servers(home: Path) -> list[RunningServer]:
    """The servers now running on this store; records left by servers that died are deleted."""
    folder = _folder(home)
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            server = RunningServer(int(data["pid"]), str(data["url"]), tuple(str(m) for m in data["models"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # just removed by its server, or not a record: nothing to warn about
        lock = FileLock(path.with_suffix(".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            found.append(server)  # its server holds the lock: it runs
            continue
        lock.release()
        path.unlink(missing_ok=True)
        Path(lock.lock_file).unlink(missing_ok=True)
    return found


def servers_serving(home: Path, model: str) -> list[RunningServer]:
    """The running servers that serve this store name."""
    return [server for server in running_servers(home) if model in server.models]
