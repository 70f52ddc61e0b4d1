"""The chat page: static files from the package (sovereign/webui/), served at / to browsers and under /ui/.

Nothing on the page comes from elsewhere: every script, style and icon is one of these files, and the
Content-Security-Policy sent with each of them lets the browser load or connect to this server only.
The files are read and gzipped once per process, when the first app is built, and answered from memory with an ETag,
so a reload costs a 304 per file and no disk read.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
PREFIX = "/ui/"
# 'self' only: no CDN, no font service, no analytics, and model output cannot pull in a remote image.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_SERVED_SUFFIXES = frozenset({".html", ".js", ".mjs", ".css", ".svg", ".png", ".ico", ".json", ".txt", ".md"})


@dataclass(frozen=True)
class StaticFile:
    """One file of the page, as sent: its bytes, their gzip, its type and its ETag."""

    body: bytes
    gzipped: bytes
    media_type: str
    etag: str


def load_files(root: Path = WEBUI_DIR) -> dict[str, StaticFile]:
    """Every servable file under root, by its path relative to root ('index.html', 'js/app.js', ...)."""
    files: dict[str, StaticFile] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in _SERVED_SUFFIXES:
            continue
        body = path.read_bytes()
        media_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media_type.startswith("text/") or media_type.endswith(("+xml", "/json")):
            media_type += "; charset=utf-8"
        # mtime=0: the same bytes gzip the same way on every start, so caches and tests see stable output.
        gzipped = gzip.compress(body, compresslevel=9, mtime=0)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[path.relative_to(root).as_posix()] = StaticFile(body, gzipped, media_type, etag)
    return files


@functools.cache
def packaged_files() -> dict[str, StaticFile]:
    """The package's own page files, read and gzipped once per process (every app built here serves the same)."""
    return load_files(WEBUI_DIR)


def wants_page(request: Request) -> bool:
    """Whether GET / comes from a browser (it asks for HTML) rather than an API client checking the server."""
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def respond(request: Request, file: StaticFile) -> Response:
    """The file, gzipped when the client takes it, or 304 when its copy is current."""
    headers = {
        "ETag": file.etag,
        # Revalidate every time: the files change with an upgrade, and a 304 on loopback costs nothing.
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Vary": "Accept-Encoding",
    }
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = file.body
    if "gzip" in request.headers.get("accept-encoding", ""):
        body = file.gzipped
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=file.media_type, headers=headers)


def router(files: dict[str, StaticFile]) -> APIRouter:
    """Routes for the page's assets under /ui/ (the page itself is answered at / by the app)."""
    routes = APIRouter()

    @routes.api_route(PREFIX + "{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(request: Request, name: str) -> Response:
        if name in ("", "index.html"):  # the page's paths are relative to /: here they would all miss
            return RedirectResponse("/", status_code=307)
        file = files.get(name)
        if file is None:
            return Response("Not found", status_code=404, media_type="text/plain")
        return respond(request, file)

    return routes
