"""A model's GGUF header over HTTP Range requests: its shape and size without downloading its weights.

The header holds the vocabulary, so it runs from under 1 MB to about 16 MB; reading starts with
2 MiB and doubles until the header parses, up to 64 MiB. Hugging Face repositories are listed
through huggingface-hub (HF_ENDPOINT, then the mirrors) to find the file and its size, as `pull`
does; direct URLs are read as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from sovereign.config import Settings
from sovereign.errors import PullError, SourceUnavailable
from sovereign.refs import HfRef, SourceRef, UrlRef
from sovereign.store.gguf_header import NeedMoreBytes, kv_bytes_per_token, parse_header, quantization_of
from sovereign.store.http.transport import content_range_total, make_client, raise_for_status, total_size

FIRST_READ = 2 * 2**20
LARGEST_READ = 64 * 2**20


@dataclass(frozen=True)
class RemoteModel:
    """What a remote GGUF's header says, and the model's total size."""

    metadata: dict[str, Any]
    quantization: str | None
    parameters: int
    size: int  # bytes, every split file included
    kv_bytes_per_token: int


def read_remote(ref: SourceRef, settings: Settings) -> RemoteModel | None:
    """The header facts of a model at a Hugging Face or URL source; None for sources without one (pip, local)."""
    if isinstance(ref, UrlRef):
        metadata, tensors, total = _read_header(ref.url, {}, settings.allow_http)
        return _model(metadata, tensors, total)
    if isinstance(ref, HfRef):
        failures = []
        for endpoint in dict.fromkeys(e.rstrip("/") for e in (settings.hf_endpoint, *settings.hf_mirrors)):
            try:
                return _read_hf(ref, endpoint, settings)
            except PullError as exc:
                failures.append(exc.message)
        raise SourceUnavailable("; ".join(failures), "check the network, or add a mirror with SOVEREIGN_HF_MIRRORS")
    return None


def _model(metadata: dict[str, Any], tensors: list[tuple[int, int]], size: int) -> RemoteModel:
    return RemoteModel(
        metadata,
        quantization_of(metadata, tensors),
        sum(elements for elements, _ in tensors),
        size,
        kv_bytes_per_token(metadata),
    )


def _read_hf(ref: HfRef, endpoint: str, settings: Settings) -> RemoteModel:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from sovereign.store.sources.hf import choose_files, list_repository

    listing, token = list_repository(ref, endpoint, settings)
    names = choose_files(list(listing), ref)
    if missing := [n for n in names if n not in listing]:
        raise SourceUnavailable(
            f"{ref.repo} lacks split files {', '.join(missing)}", "the upload is incomplete; try another source"
        )
    url = hf_hub_url(ref.repo, names[0], revision=ref.revision, endpoint=endpoint)
    metadata, tensors, _ = _read_header(
        url, build_hf_headers(token=token, library_name="sovereign"), settings.allow_http
    )
    # The first split's header holds the shape; its tensors are only that split's share of the weights.
    parameters = sum(elements for elements, _ in tensors) if len(names) == 1 else 0
    return RemoteModel(
        metadata,
        quantization_of(metadata, tensors),
        parameters,
        sum(listing[n][0] for n in names),
        kv_bytes_per_token(metadata),
    )


def _read_header(
    url: str, headers: dict[str, str], allow_http: bool
) -> tuple[dict[str, Any], list[tuple[int, int]], int]:
    """(metadata, tensors, file size) from the first bytes of the file at url, read in growing ranges."""
    buffer = bytearray()
    total: int | None = None
    wanted = FIRST_READ
    name = url.rsplit("/", 1)[-1]
    with make_client(allow_http) as client:
        while True:
            request_headers = {**headers, "Range": f"bytes={len(buffer)}-{wanted - 1}", "Accept-Encoding": "identity"}
            try:
                with client.stream("GET", url, headers=request_headers) as response:
                    raise_for_status(response, url)
                    if response.status_code == 206:
                        total = content_range_total(response) or total
                    else:  # the server ignored Range: read the start of the whole file
                        buffer.clear()
                        total = total_size(response, 0)
                    for chunk in response.iter_bytes():
                        buffer += chunk
                        if len(buffer) >= wanted:
                            break
            except httpx.HTTPError as exc:
                raise SourceUnavailable(f"cannot read {url} ({type(exc).__name__})", "check the network") from None
            try:
                metadata, tensors, needed = parse_header(bytes(buffer), name)
                return metadata, tensors, total or needed
            except NeedMoreBytes:
                if wanted >= LARGEST_READ or (total is not None and len(buffer) >= total):
                    raise SourceUnavailable(
                        f"{url} has no complete GGUF header in its first {len(buffer):,} bytes", "is it a GGUF file?"
                    ) from None
                wanted *= 2
