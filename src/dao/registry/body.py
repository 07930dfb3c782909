"""Reading response bodies whole, with a cap.

A body arrives in as many pieces as the path cut it into: over a long link a 2 KB token is two TCP segments,
and ``StreamReader.read(n)`` returns only what has arrived so far. Every small body (tokens, manifests, error
documents, listings) is read here, to its end or to the cap, never with a single ``read(n)``.
"""

from __future__ import annotations

import aiohttp

from dao.registry.errors import UpstreamStatusError, UpstreamUnavailable


def read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions reading a response body may raise; translate them to :class:`UpstreamUnavailable`."""
    return (aiohttp.ClientError, TimeoutError, OSError)


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, however many pieces it comes in.

    Raises :class:`UpstreamStatusError` when it is longer than ``limit`` (read no further than one byte past
    it), :class:`UpstreamUnavailable` when the connection breaks first.
    """
    chunks: list[bytes] = []
    total = 0
    try:
        while total <= limit:
            chunk = await resp.content.read(limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except read_errors() as exc:
        raise UpstreamUnavailable(f"reading {resp.url.path}: {exc.__class__.__name__}: {exc}") from exc
    if total > limit:
        raise UpstreamStatusError(f"{resp.url.host}{resp.url.path}: response larger than {limit} bytes", resp.status)
    return b"".join(chunks)
