"""Metrics waiting for the console: a bounded ring, so an agent that cannot reach the console keeps
sampling, sends what it took on reconnect (no gap in the charts), and never grows without bound.

Each sample gets a sequence number. Samples stay until the console acknowledges them (``ack(seq)``: stored),
so a connection that breaks after a send loses nothing: the next connection sends again from the first
unacknowledged one. When the ring is full the oldest samples go first (an outage longer than the ring is
remembered by its latest part).
"""

from __future__ import annotations

from collections import deque
from typing import Any


class Outbox:
    def __init__(self, capacity: int = 8640) -> None:  # a day at one sample every 10 s
        self.capacity = max(1, capacity)
        self._items: deque[tuple[int, dict[str, Any]]] = deque()
        self.next_seq = 1
        self.dropped = 0  # samples pushed out by a full ring, for the agent's log

    def add(self, sample: dict[str, Any]) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self._items.append((seq, sample))
        while len(self._items) > self.capacity:
            self._items.popleft()
            self.dropped += 1
        return seq

    def batch(self, after: int = 0, limit: int = 500) -> tuple[int, list[dict[str, Any]]]:
        """Up to ``limit`` samples after ``after`` (the last seq already sent on this connection), oldest
        first, with the last one's seq; (after, []) when there is nothing newer."""
        out: list[dict[str, Any]] = []
        last = after
        for seq, sample in self._items:
            if seq <= after:
                continue
            out.append(sample)
            last = seq
            if len(out) >= limit:
                break
        return last, out

    def ack(self, seq: int) -> None:
        """The console stored every sample up to ``seq``."""
        while self._items and self._items[0][0] <= seq:
            self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
