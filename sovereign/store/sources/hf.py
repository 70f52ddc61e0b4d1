"""Hugging Face repositories through huggingface-hub, across HF_ENDPOINT and mirrors in order.

huggingface-hub lists the repository (`model_info(files_metadata=True)` gives each file's size
and LFS sha256, so every Hugging Face pull is verified even when the catalog knows no hash),
builds the download URLs and the auth headers (HF_TOKEN), and its exceptions tell gated from
missing. The bytes go through our resumable downloader: huggingface-hub 2.x deletes its partial
file when a transfer fails, so a Ctrl-C would start over. Staging is keyed by repository file,
not endpoint, so a download cut on one mirror resumes from the next.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from sovereign.config import Settings
from sovereign.errors import AccessDenied, InsufficientDisk, PullError, SourceUnavailable
from sovereign.refs import HfRef
from sovereign.store.files import ensure_free_space, partial_size, verify_file
from sovereign.store.http.download import download
from sovereign.store.http.transport import check_transport
from sovereign.store.sources.base import SHARD_PATTERN, FetchContext, Fetched, FetchedFile, shard_siblings


def _transport_errors() -> tuple[type[Exception], ...]:
    """The transport errors of whichever HTTP library this huggingface-hub runs on.

    2.x uses httpx2, 1.x httpx, 0.x requests (whose errors are OSErrors): catching each one that is
    installed keeps a pull working with every release that pyproject.toml allows.
    """
    errors: list[type[Exception]] = [OSError, httpx.HTTPError]
    try:
        import httpx2
    except ImportError:
        pass
    else:
        errors.append(httpx2.HTTPError)
    return tuple(errors)


@contextmanager
def _hub_errors(endpoint: str, repo: str) -> Iterator[None]:
    """Turn huggingface-hub and transport exceptions into our typed errors (by class, never text)."""
    from huggingface_hub import errors as hub

    try:
        yield
    except hub.GatedRepoError:
        raise AccessDenied(
            f"{repo} is gated on {endpoint} and needs an access token",
            f"accept its license at {endpoint}/{repo} and set HF_TOKEN to a token with access",
        ) from None
    except hub.RepositoryNotFoundError:
        raise SourceUnavailable(
            f"{endpoint} has no repository {repo}", "check the name; private repositories also need HF_TOKEN"
        ) from None
    except hub.RevisionNotFoundError:
        raise SourceUnavailable(f"{endpoint} has no such revision of {repo}", "check the revision") from None
    except hub.EntryNotFoundError:
        raise SourceUnavailable(
            f"{endpoint} could not serve the file from {repo}", "check the network or try another mirror"
        ) from None
    except hub.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            raise AccessDenied(
                f"{endpoint} refused access to {repo} (HTTP {status})", "set HF_TOKEN to a token with access"
            ) from None
        raise SourceUnavailable(
            f"{endpoint} answered HTTP {status} for {repo}", "try again later or use another mirror"
        ) from None
    except _transport_errors() as exc:
        raise SourceUnavailable(
            f"cannot reach {endpoint} ({type(exc).__name__})", "check the network, or add a mirror with --mirror"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # e.g. a captive portal's HTML instead of JSON
        raise SourceUnavailable(
            f"{endpoint} did not answer like a Hugging Face hub ({type(exc).__name__})",
            "check the endpoint URL, or try another mirror",
        ) from None


def choose_files(names: list[str], ref: HfRef) -> list[str]:
    """The repository files that make up the requested model, split 1 first."""
    if ref.filename:
        if ref.filename not in names:
            raise SourceUnavailable(
                f"{ref.repo} has no file {ref.filename}", "check the file name (it is case-sensitive)"
            )
        return shard_siblings(names, ref.filename)
    quant = ref.quant or "Q4_K_M"
    pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
    ggufs = [n for n in names if n.endswith(".gguf") and "mmproj" not in n.lower()]
    matches = [n for n in ggufs if pattern.search(n)]
    firsts = [n for n in matches if not (m := SHARD_PATTERN.match(Path(n).name)) or m["index"] == "00001"]
    if not firsts:
        listing = ", ".join(Path(n).name for n in ggufs[:8]) or "no GGUF files"
        raise SourceUnavailable(
            f"{ref.repo} has no {quant} GGUF (it has: {listing})", f"pick a quantization, e.g. hf.co/{ref.repo}:Q8_0"
        )
    if len(firsts) > 1:
        raise SourceUnavailable(
            f"{ref.repo} has several {quant} files: {', '.join(firsts)}", f"name one: hf.co/{ref.repo}/FILE.gguf"
        )
    return shard_siblings(names, firsts[0])


def list_repository(
    ref: HfRef, endpoint: str, settings: Settings
) -> tuple[dict[str, tuple[int, str | None]], str | bool | None]:
    """Each file of the repository with its size and LFS sha256, and the token to send this endpoint."""
    from huggingface_hub import HfApi

    check_transport(endpoint, settings.allow_http)  # the listing's hashes are only as safe as its transport
    # The token goes to HF_ENDPOINT only: a third-party mirror never sees the user's credentials.
    # (False tells huggingface-hub not to fall back to a cached token either.)
    token: str | bool | None = settings.hf_token if endpoint == settings.hf_endpoint else False
    with _hub_errors(endpoint, ref.repo):
        info = HfApi(endpoint=endpoint, token=token).model_info(ref.repo, revision=ref.revision, files_metadata=True)
    try:
        return {s.rfilename: (int(s.size or 0), s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}, token
    except (AttributeError, TypeError, ValueError):
        raise SourceUnavailable(f"{endpoint} sent a malformed listing for {ref.repo}", "try another mirror") from None


class HfSource:
    """A model in a Hugging Face repository, tried on every configured endpoint in order."""

    kind = "hf"

    def __init__(self, ref: HfRef) -> None:
        self.ref = ref

    def describe(self) -> str:
        """The hf.co reference."""
        return str(self.ref)

    def endpoints(self, ctx: FetchContext) -> list[str]:
        """--mirror first, then HF_ENDPOINT (or huggingface.co), then SOVEREIGN_HF_MIRRORS."""
        ordered = [*ctx.mirrors, ctx.settings.hf_endpoint, *ctx.settings.hf_mirrors]
        return list(dict.fromkeys(e.rstrip("/") for e in ordered))

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Fetch from the first endpoint that works; raise the most useful failure otherwise."""
        endpoints = self.endpoints(ctx)
        failures: list[PullError] = []
        for index, endpoint in enumerate(endpoints):
            try:
                return self._fetch_from(endpoint, ctx)
            except InsufficientDisk:
                raise
            except PullError as exc:
                failures.append(exc)
                if index + 1 < len(endpoints):
                    ctx.reporter.status(f"{exc.message}; trying {endpoints[index + 1]}")
        denied = [f for f in failures if isinstance(f, AccessDenied)]
        if denied:
            raise denied[0]
        if len(failures) == 1:
            raise failures[0]
        raise type(failures[-1])("; ".join(f.message for f in failures), failures[-1].hint)

    def _fetch_from(self, endpoint: str, ctx: FetchContext) -> Fetched:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        siblings, token = list_repository(self.ref, endpoint, ctx.settings)
        names = choose_files(list(siblings), self.ref)
        missing = [n for n in names if n not in siblings]
        if missing:
            raise SourceUnavailable(
                f"{self.ref.repo} lacks split files {', '.join(missing)}",
                "the upload is incomplete; try another source",
            )
        # One staging folder per file (keyed by repository path, not endpoint): pulls of other files
        # of the same repository never touch it, and a cut on one mirror resumes on the next.
        stagings = {n: ctx.store.partial_path(f"hf:{self.ref.repo}@{self.ref.revision}/{n}") for n in names}
        targets = {n: stagings[n] / Path(n).name for n in names}
        # The listing gives every size, so one check up front covers the whole (possibly split) model.
        ensure_free_space(
            stagings[names[0]],
            sum(siblings[n][0] - partial_size(targets[n]) for n in names),
            ctx.settings.min_free_bytes,
        )
        ctx.reporter.status(f"fetching {len(names)} file(s) from {endpoint}/{self.ref.repo}")
        headers = build_hf_headers(token=token, library_name="sovereign")

        def check_space(remaining: int) -> None:  # checked again as bytes arrive: other programs fill disks too
            ensure_free_space(stagings[names[0]], remaining, ctx.settings.min_free_bytes)

        fetched = []
        for name in names:
            size, lfs_sha = siblings[name]
            expected_sha = (ctx.expected.sha256 if len(names) == 1 else None) or lfs_sha
            target = targets[name]
            url = hf_hub_url(self.ref.repo, name, revision=self.ref.revision, endpoint=endpoint)
            try:
                actual = download(
                    url,
                    target,
                    ctx.reporter,
                    allow_http=ctx.settings.allow_http,
                    headers=headers,
                    check_space=check_space,
                )
            except AccessDenied:
                raise AccessDenied(
                    f"{self.ref.repo} is gated or private on {endpoint} and needs an access token",
                    f"accept its license at {endpoint}/{self.ref.repo} and set HF_TOKEN to a token with access",
                ) from None
            sha = verify_file(
                target, expected_sha, size or None, ctx.reporter, f"{endpoint}/{self.ref.repo}/{name}", actual
            )
            fetched.append(FetchedFile(target, target.name, target.stat().st_size, sha, expected_sha is not None))
        return Fetched(fetched, f"from {endpoint}", cleanup=list(stagings.values()))
