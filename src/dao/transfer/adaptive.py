"""How many parallel streams a transfer opens: as many as still make it faster, no more.

A loss-based TCP (reno, cubic) on a long path with random loss is held far below the link's rate per stream
(its rate falls with the square root of the loss), so a fixed count is wrong both ways: 6 streams fill a clean
link but use a third of a 40 mbit, 160 ms, 0.2 %-loss one; 30 streams fill that one but are 30 connections an
upstream must carry for nothing on a clean link. So the count is found while the bytes flow:

- start at ``initial``; once the streams have settled (new connections need a handshake, a request and a
  slow start: a few round trips), measure the total rate over a window;
- double the count (multiplicative: the right count is reached in one or two steps, at the price of up to
  twice the streams that would do) and measure again; keep raising while each step makes the total rate
  grow by at least ``margin``;
- when a step does not, drop back to the count before it and hold there: the link (or the upstream) is full.

Pure: the caller feeds the clock and its byte counter (:meth:`StreamCount.observe`) and opens or retires
streams to match :attr:`StreamCount.target`. Holding is for the rest of the transfer; a blob's transfer is
short next to how fast a path's loss and load change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SETTLE_RTTS = 2.5  # round trips a new count needs before its rate means anything (handshake, request, slow start)
WINDOW_RTTS = 4.0  # round trips of each measurement
WINDOW_MIN = 0.4  # seconds: below this, the rate of a few streams is noise
WINDOW_MAX = 2.0


@dataclass(slots=True)
class StreamCount:
    initial: int
    cap: int
    growth: float = 2.0
    margin: float = 0.10  # the total rate must grow by this fraction for a step to stay
    target: int = 0
    held: bool = False
    steps: list[tuple[int, float]] = field(default_factory=list)  # (count, bytes/s) measured, for the log
    _rtt: float = 0.1
    _changed: float | None = None  # when the current count was set (it settles from there)
    _since: float = 0.0  # when the current count's measurement window started
    _base: int = -1  # the byte counter at that moment; -1 while settling
    _before: tuple[int, float] | None = None  # the count before the current one and its rate

    def __post_init__(self) -> None:
        self.cap = max(1, self.cap)
        self.initial = max(1, min(self.initial, self.cap))
        self.target = self.initial
        self.held = self.initial >= self.cap

    def start(self, now: float, rtt: float) -> None:
        """The streams of the current count are open (``rtt``: a round trip as the first answer showed it)."""
        self._rtt = max(rtt, 0.001)
        self._changed, self._base = now, -1

    def round_trip(self, seconds: float) -> None:
        """A request's wait for its answer: the shortest seen is the best guess of a round trip (a fresh
        connection's first answer also waits for the handshake, a first blob request maybe for a token)."""
        self._rtt = max(0.001, min(self._rtt, seconds))

    @property
    def window(self) -> float:
        return min(WINDOW_MAX, max(WINDOW_MIN, WINDOW_RTTS * self._rtt))

    def observe(self, now: float, total: int) -> int:
        """``total``: bytes received so far by all streams. Returns the count to run now."""
        if self.held or self._changed is None or now < self._changed + SETTLE_RTTS * self._rtt:
            return self.target
        if self._base < 0:  # settled: the window starts here
            self._base, self._since = total, now
            return self.target
        if now - self._since < self.window:
            return self.target
        rate = (total - self._base) / (now - self._since)
        self.steps.append((self.target, rate))
        if self._before is not None and rate < self._before[1] * (1 + self.margin):
            self.target = self._before[0]  # that step bought nothing: back, and stay
            self.held = True
            return self.target
        self._before = (self.target, rate)
        self.target = min(self.cap, max(self.target + 1, math.ceil(self.target * self.growth)))
        self.held = self.target == self._before[0]
        self._changed, self._base = now, -1
        return self.target
