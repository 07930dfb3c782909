"""The scheduler's split rule, on hand-made chunks: which running chunk gives half to an idle connection.

End to end, whether the tail of a pull ever has one long chunk depends on claim order; here the situation is
made exactly, so the rule itself can fail.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from dao.pull.fetch import SPLIT_MIN, Fetcher, Stats
from dao.pull.partial import Claim
from dao.pull.route import Peer

MiB = 1024 * 1024
DIGEST = "sha256:" + "a" * 64


def _peer(ranges: bool = True) -> Peer:
    return Peer(SimpleNamespace(url="http://m", mirror=True), rank=0, ranges=ranges)  # type: ignore[arg-type]


def _claim(blob: Any, peer: Peer, start: int, end: int, done: int, running_for: float) -> Claim:
    claim = Claim(blob, start, end, peer)
    claim.started = time.monotonic() - running_for
    claim.pos = start + done
    blob.claims.append(claim)
    return claim


def _fetcher(blob: Any, peers: list[Peer]) -> Any:
    return SimpleNamespace(_blobs=[blob], peers=peers, per_source=16, stats=Stats())


def _blob() -> Any:
    return SimpleNamespace(done=SimpleNamespace(done=lambda: False), checking=False, claims=[], digest=DIGEST)


def test_the_chunk_with_most_left_gives_its_second_half() -> None:
    peer, blob = _peer(), _blob()
    # 1 MB/s each: one has 6 MiB left (6 s), the other 20 MiB (20 s)
    short = _claim(blob, peer, 0, 8 * MiB, 2 * MiB, 2.0)
    long = _claim(blob, peer, 8 * MiB, 30 * MiB, 2 * MiB, 2.0)
    fetcher = _fetcher(blob, [peer])
    got = Fetcher._split(fetcher)
    assert got is not None
    to, second, cursor = got
    assert to is peer and cursor == second.start == second.pos
    middle = 10 * MiB + (20 * MiB) // 2
    assert (long.end, second.start, second.end) == (middle, middle, 30 * MiB)
    assert short.end == 8 * MiB and fetcher.stats.split == 1 and peer.active == 1
    assert second in blob.claims


def test_no_split_when_it_would_not_pay() -> None:
    peer = _peer()
    cases = {
        "done within the ETA": (0, 4 * MiB, 3 * MiB, 1.0, False),  # 1 MiB left at 3 MiB/s
        "just started": (0, 64 * MiB, 0, 0.1, False),
        "too small to halve": (0, 2 * SPLIT_MIN - 1, 0, 5.0, False),
        "already raced": (0, 64 * MiB, MiB, 2.0, True),
    }
    for name, (start, end, done, running_for, raced) in cases.items():
        blob = _blob()
        _claim(blob, peer, start, end, done, running_for).raced = raced
        assert Fetcher._split(_fetcher(blob, [peer])) is None, name


def test_no_split_onto_a_source_that_ignores_range() -> None:
    blob = _blob()
    _claim(blob, _peer(), 0, 64 * MiB, MiB, 2.0)
    assert Fetcher._split(_fetcher(blob, [_peer(ranges=False)])) is None
