"""A direct URL to a .gguf file: HTTPS anywhere, plain HTTP only on loopback unless allowed."""

from __future__ import annotations

import ipaddress
from pathlib import PurePosixPath
from urllib.parse import urlparse

from sovereign.errors import InvalidReference
from sovereign.refs import UrlRef, sanitize_tag
from sovereign.store.files import ensure_free_space, verify_file
from sovereign.store.http_download import download
from sovereign.store.sources.base import FetchContext, Fetched, FetchedFile


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UrlSource:
    """One GGUF file at a URL."""

    kind = "url"

    def __init__(self, ref: UrlRef) -> None:
        self.url = ref.url
        parsed = urlparse(ref.url)
        self.scheme, self.host = parsed.scheme.lower(), parsed.hostname or ""
        name = PurePosixPath(parsed.path).name or "model.gguf"
        self.filename = sanitize_tag(name if name.endswith(".gguf") else name + ".gguf")

    def describe(self) -> str:
        """The URL."""
        return self.url

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Download (resuming a previous attempt), then check size, magic and sha256."""
        if self.scheme == "http" and not (_is_loopback(self.host) or ctx.settings.allow_http):
            raise InvalidReference(
                f"refusing plain http for {self.host}: the model could be tampered with in transit",
                "use https, or set SOVEREIGN_ALLOW_HTTP=1 if you trust this network",
            )
        staging = ctx.store.partial_path(f"url:{ctx.expected.sha256 or self.url}")
        target = staging / self.filename
        ensure_free_space(staging, ctx.expected.size or 0, ctx.settings.min_free_bytes)
        actual = download(
            self.url,
            target,
            ctx.reporter,
            check_space=lambda remaining: ensure_free_space(staging, remaining, ctx.settings.min_free_bytes),
        )
        sha = verify_file(target, ctx.expected.sha256, ctx.expected.size, ctx.reporter, self.url, actual)
        return Fetched([FetchedFile(target, self.filename, target.stat().st_size, sha, bool(ctx.expected.sha256))], cleanup=[staging])
