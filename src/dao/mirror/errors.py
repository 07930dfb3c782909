"""Why the mirror cannot answer a request, in its own terms.

The proxy, the router and the meter raise these; only the HTTP boundary (:func:`dao.mirror.app.wire`) turns
them into OCI error codes, statuses and headers, so what a client sees is decided in one table.
"""

from __future__ import annotations

from typing import Literal

from dao.mirror.availability import CircuitOpen
from dao.registry.errors import (
    RegistryClientError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamUnauthorized,
)

Subject = Literal["blob", "manifest", "repository"]


class MirrorError(Exception):
    """``retry_after``: seconds after which asking again may work, when known."""

    cache: str | None = None  # what the access log shows as the cache outcome, when the error decides it

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class NotFound(MirrorError):
    """The blob, manifest or repository is not there (upstream said so, or it may not be shared here)."""

    def __init__(self, subject: Subject, message: str) -> None:
        super().__init__(message)
        self.subject = subject


class Remembered(NotFound):
    """An upstream "not found" answered from the negative cache, without asking upstream again."""

    cache = "negative"


class NotProxied(MirrorError):
    """A registry (or a route) this mirror does not serve: never an open proxy."""


class BadName(MirrorError):
    """A repository name, tag or digest that is not valid."""


class BadDigest(BadName):
    pass


class BadTag(BadName):
    pass


class Denied(MirrorError):
    """The mirror's allow/deny rules refuse this repository."""


class Busy(MirrorError):
    """The mirror's own fetch queue is full: nothing to do with the upstream."""


class QuotaUsed(MirrorError):
    """The user's monthly quota is used up."""


class NotAuthenticated(MirrorError):
    """The mirror serves its users only, and this request names none."""


class UpstreamDown(MirrorError):
    """The upstream cannot be reached, times out, or its circuit is open."""


class UpstreamLimited(MirrorError):
    """The upstream rate-limits the mirror."""


class UpstreamRefused(MirrorError):
    """The upstream refuses the mirror's credentials (or asks for some)."""


class UpstreamBroken(MirrorError):
    """The upstream answered with something no client should get (a 4xx/5xx that is not one of the above)."""


def upstream_error(exc: RegistryClientError | CircuitOpen, subject: Subject) -> MirrorError:
    """What an upstream failure means for the client: the upstream's own 404/401/429, else broken or down."""
    if isinstance(exc, CircuitOpen):
        return UpstreamDown(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, UpstreamNotFound):
        return NotFound(subject, str(exc))
    if isinstance(exc, UpstreamRateLimited):
        return UpstreamLimited(f"upstream registry rate limit: {exc}")
    if isinstance(exc, UpstreamUnauthorized):
        return UpstreamRefused(f"upstream registry refused the mirror: {exc}")
    if isinstance(exc, UpstreamStatusError) and 400 <= exc.status < 500:
        return UpstreamBroken(str(exc))
    return UpstreamDown(f"upstream registry unavailable: {exc}")
