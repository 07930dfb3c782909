"""Keeping the mirror quick when the upstream is not: a circuit breaker and a short memory of 404s.

Docker and containerd try the next endpoint only when a mirror answers; a mirror that waits out an upstream
timeout on every request makes each pull hang for as long. The :class:`CircuitBreaker` counts upstream failures
in a row; after ``threshold`` of them it *opens* and the proxy stops asking upstream for ``cooldown`` seconds --
answers come from the cache or fail at once. After the cooldown one request is let through (*half-open*); its
outcome closes the circuit or opens it for another cooldown.

:class:`NegativeCache` remembers upstream "not found" answers for a few seconds, so a client (or a CI fleet)
retrying a typo'd tag costs the upstream one request, not one per retry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitOpen(Exception):
    """The upstream failed too often lately; it is not asked until ``retry_after`` seconds have passed."""

    def __init__(self, upstream: str, retry_after: float) -> None:
        super().__init__(f"upstream {upstream} is failing; not asking it for another {retry_after:.0f}s")
        self.retry_after = retry_after


class CircuitBreaker:
    def __init__(
        self, upstream: str, *, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.upstream = upstream
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self._opened_at: float | None = None
        self._trial = False  # a half-open trial request is out

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self._opened_at < self.cooldown or self._trial:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def check(self) -> None:
        """Call before asking upstream; raises :class:`CircuitOpen` when we should not.

        In the half-open state the first caller becomes the trial and the rest are refused until it reports.
        """
        state = self.state
        if state is CircuitState.CLOSED:
            return
        if state is CircuitState.HALF_OPEN:
            self._trial = True
            return
        assert self._opened_at is not None
        raise CircuitOpen(self.upstream, max(self._opened_at + self.cooldown - self.clock(), 1.0))

    def success(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        if self._trial or self.failures >= self.threshold:
            self._opened_at = self.clock()
            self._trial = False


class NegativeCache:
    """``key -> expiry`` for upstream 404s, bounded in size (the oldest entries go first)."""

    def __init__(self, ttl: float, *, limit: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._entries: OrderedDict[tuple[str, ...], float] = OrderedDict()

    def add(self, key: tuple[str, ...]) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = self.clock() + self.ttl
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def __contains__(self, key: tuple[str, ...]) -> bool:
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if self.clock() >= expiry:
            del self._entries[key]
            return False
        return True

    def discard(self, key: tuple[str, ...]) -> None:
        self._entries.pop(key, None)
