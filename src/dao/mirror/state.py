"""What one request learned on its way through the mirror, for the access log, /metrics and the usage meter.

One typed object under one request key, instead of string keys scattered over the handlers: every field is
written by exactly the layer that knows it (the router the registry, the proxy the cache outcome, the sender
the bytes) and read at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(slots=True)
class RequestState:
    route: str = "other"  # base, manifests, blobs, tags, metrics, health, other
    cache: str = "-"  # hit, miss, join, swr, revalidated, stale, negative, -
    sent: int | None = None  # body bytes that went out (None: the response's own body length)
    failure: str | None = None  # why the request failed, once it did
    user: str | None = None  # the user ID the meter counts
    user_name: str | None = None  # what the log calls them (never a secret)
    registry: str | None = None  # the upstream registry the request was routed to


STATE_KEY = web.RequestKey("dao_state", RequestState)


def state(request: web.BaseRequest) -> RequestState:
    found = request.get(STATE_KEY)
    if found is None:
        found = request[STATE_KEY] = RequestState()
    return found
