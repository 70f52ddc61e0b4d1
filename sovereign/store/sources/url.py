"""A direct URL to a .gguf file: HTTPS anywhere, plain HTTP only on loopback unless allowed."""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlparse

from sovereign.refs import UrlRef, sanitize_tag
from sovereign.store.files import ensure_free_space, partial_size, verify_file
from sovereign.store.http.download import download
from sovereign.store.http.transport import check_transport
from sovereign.store.sources.base import FetchContext, Fetched, FetchedFile


class UrlSource:
    """One GGUF file at a URL."""

    kind = "url"

    def __init__(self, ref: UrlRef) -> None:
        self.url = ref.url
        name = PurePosixPath(urlparse(ref.url).path).name or "model.gguf"
        self.filename = sanitize_tag(name if name.endswith(".gguf") else name + ".gguf")

    def describe(self) -> str:
        """The URL."""
        return self.url

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Download (resuming a previous attempt), then check size, magic and sha256."""
        check_transport(self.url, ctx.settings.allow_http)
        staging = ctx.store.partial_path(f"url:{ctx.expected.sha256 or self.url}")
        target = staging / self.filename
        if ctx.expected.size:
            ensure_free_space(staging, ctx.expected.size - partial_size(target), ctx.settings.min_free_bytes)
        actual = download(
            self.url,
            target,
            ctx.reporter,
            allow_http=ctx.settings.allow_http,
            check_space=lambda remaining: ensure_free_space(staging, remaining, ctx.settings.min_free_bytes),
        )
        sha = verify_file(target, ctx.expected.sha256, ctx.expected.size, ctx.reporter, self.url, actual)
        return Fetched(
            [FetchedFile(target, self.filename, target.stat().st_size, sha, bool(ctx.expected.sha256))],
            cleanup=[staging],
        )
