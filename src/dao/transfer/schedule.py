"""Which bytes a free connection fetches next, and from where: the transfer's decisions, without its I/O.

The jobs' missing bytes are one pool of work. A free connection takes, in this order:

1. a position a reader waits at that nobody fetches (the longest wait first): a client's ``Range`` in the
   middle of a cold blob gets its first bytes in a round trip, not when the other streams get there;
2. the front of the first job with unclaimed bytes (earlier jobs first), sized to ~``chunk_seconds`` of its
   source's measured per-connection speed, and to a fair share of what is left once the transfer nears its
   end, so every connection stays busy until the last byte and a slow source never holds a big piece. A job
   of unknown size gets one first request of ``first_chunk`` bytes; its answer says the size;
3. nothing left to hand out: the slowest running chunk, raced by a source measured much faster
   (:meth:`Scheduler.reissue`);
4. still nothing: the running chunk with the most left gives its second half to this connection
   (:meth:`Scheduler.split`), when the policy allows it (the first request then stops early, and the bytes
   it had in flight are lost: a mirror whose uplink is billed by the byte says no).

A source that ignores ``Range`` (``Peer.ranges is False``) only ever gets the rest of a blob, from its start.
Everything here is a function of the jobs, the sources and the clock it is given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from dao.transfer.job import OPEN_END, Claim, Job
from dao.transfer.sources import Peer, can_serve, pick

log = logging.getLogger("dao.transfer")

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Policy:
    connections: int = 16  # to start with
    max_connections: int = 16  # at most; more than ``connections`` while they make it faster (adaptive.py)
    per_source: int = 16  # connections to one source at most
    first_chunk: int = 4 * MiB  # a chunk before its source is measured; the first request of an unknown size
    chunk_seconds: float = 4.0  # a chunk is this much of its source's measured per-connection speed
    chunk_min: int = 512 * 1024  # below this a request's round trip costs too much of its time
    chunk_max: int = 64 * MiB
    split: bool = True  # may halve a running chunk for an idle connection (its bytes in flight are lost)
    split_eta: float = 1.5  # seconds a running chunk must still need before an idle connection takes half
    split_min: int = 256 * 1024  # neither half smaller than this
    reissue_eta: float = 2.0  # seconds a running chunk must still need before a faster source races it
    reissue_speedup: float = 2.0  # how much faster (measured) the second source must be
    resume_attempts: int = 3  # consecutive requests to the last source without a new byte
    stall_timeout: float = 15.0
    first_final: bool = False  # the first request's failure is the answer (a mirror passes it on as it is)
    backoff_base: float = 0.2
    backoff_max: float = 2.0


@dataclass(slots=True)
class Stats:
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    cached_bytes: int = 0
    reissued: int = 0  # chunks raced by a second source
    split: int = 0  # running chunks halved for an idle connection
    started: float = field(default_factory=time.monotonic)

    def count(self, url: str, n: int) -> None:
        self.bytes_by_source[url] = self.bytes_by_source.get(url, 0) + n


Assignment = tuple[Peer, Claim, int]  # who, which claim, from which byte


class Scheduler:
    def __init__(self, policy: Policy, stats: Stats | None = None) -> None:
        self.policy = policy
        self.stats = stats or Stats()

    def next(self, jobs: list[Job], peers: list[Peer], now: float, connections: int) -> Assignment | None:
        """The next chunk and its source (``connections``: how many run in all now); None when there is
        nothing to do. Jobs no source can serve any more are returned by :meth:`hopeless`."""
        remaining = 0
        candidates: list[tuple[Job, list[tuple[int, int]]]] = []
        for job in jobs:
            if job.done.done() or job.checking:
                continue
            holes = job.unclaimed()
            if not holes:
                continue
            if job.size is not None:
                remaining += sum(b - a for a, b in holes)
            candidates.append((job, holes))
        for job, holes in candidates:
            if not can_serve(peers, job.digest):
                continue
            peer = pick(peers, job.digest, self.policy.per_source)
            if peer is None:
                continue
            claim = self._claim(job, holes, peer, remaining, connections)
            if claim is None:
                continue
            claim.started = now
            job.claims.append(claim)
            peer.active += 1  # now: the next pick in this same loop turn must see it
            return peer, claim, claim.start
        return self.reissue(jobs, peers, now) or self.split(jobs, peers, now)

    def hopeless(self, jobs: list[Job], peers: list[Peer]) -> list[Job]:
        """Jobs that still need bytes, have no running claim, and that no source can serve."""
        return [
            j for j in jobs if not j.done.done() and not j.checking and not j.claims and not can_serve(peers, j.digest)
        ]

    def _claim(self, job: Job, holes: list[tuple[int, int]], peer: Peer, remaining: int, n: int) -> Claim | None:
        p = self.policy
        if job.size is None:  # the first request: its answer says the size
            start = job.have.end_of(0)
            if peer.ranges is False or p.max_connections <= 1:
                return Claim(job, start, OPEN_END, peer)
            runs_after = [a for a, _ in job.have.runs if a > start]
            return Claim(job, start, min([start + p.first_chunk, *runs_after]), peer)
        if peer.ranges is False:
            if job.claims:
                return None  # it can only send the whole blob; leave this one to the others
            return Claim(job, holes[0][0], job.size, peer)
        size = self.chunk_size(peer, remaining, n)
        while job.wanted:
            pos = job.wanted.pop(0)
            for start, end in holes:
                if start <= pos < end:
                    return Claim(job, pos, min(end, pos + size) if end - pos > size + p.chunk_min else end, peer)
        start, end = holes[0]
        if p.max_connections <= 1:
            return Claim(job, start, job.size, peer)
        if end - start > size + p.chunk_min:
            end = start + size
        return Claim(job, start, end, peer)

    def chunk_size(self, peer: Peer, remaining: int, connections: int) -> int:
        p = self.policy
        target = peer.rate * p.chunk_seconds if peer.rate else p.first_chunk
        fair = remaining // max(connections, 1)  # near the end: a share of what is left, so all finish together
        return int(max(p.chunk_min, min(p.chunk_max, target, max(fair, p.chunk_min))))

    def reissue(self, jobs: list[Job], peers: list[Peer], now: float) -> Assignment | None:
        """The running chunk that would finish last, raced by a source measured much faster than it goes."""
        p = self.policy
        best: tuple[float, Peer, Claim] | None = None
        for job in jobs:
            for claim in job.claims:
                left = claim.end - claim.pos
                if claim.raced or job.size is None or left < p.chunk_min // 4 or now - claim.started < 1.0:
                    continue
                rate = claim.rate(now)
                eta = left / max(rate, 1.0)
                if eta < p.reissue_eta:
                    continue
                peer = pick(peers, job.digest, p.per_source, exclude=claim.peer)
                if peer is None or peer.rate is None or peer.rate < p.reissue_speedup * rate:
                    continue
                if best is None or eta > best[0]:
                    best = (eta, peer, claim)
        if best is None:
            return None
        _, peer, claim = best
        claim.raced = True
        peer.active += 1
        self.stats.reissued += 1
        log.info("racing %s bytes %d-%d on %s", claim.job.digest, claim.pos, claim.end - 1, peer.url)
        return peer, claim, claim.pos

    def split(self, jobs: list[Job], peers: list[Peer], now: float) -> Assignment | None:
        """Nothing left to hand out and no faster source to race with: the running chunk with the most left
        gives its second half to this idle connection (the same source is welcome), so no connection idles
        while another still has seconds of work. The first request stops at the new boundary."""
        p = self.policy
        if not p.split:
            return None
        best: tuple[int, Claim] | None = None
        for job in jobs:
            if job.done.done() or job.checking or job.size is None:
                continue
            for claim in job.claims:
                left = claim.end - claim.pos
                if claim.raced or left < 2 * p.split_min or now - claim.started < 0.5:
                    continue
                if left / max(claim.rate(now), 1.0) < p.split_eta:
                    continue  # done soon anyway: a new request's round trips would cost more
                if best is None or left > best[0]:
                    best = (left, claim)
        if best is None:
            return None
        left, claim = best
        peer = pick(peers, claim.job.digest, p.per_source)
        if peer is None or peer.ranges is False:
            return None
        middle = claim.pos + left // 2
        second = Claim(claim.job, middle, claim.end, peer, started=now)
        claim.end = middle
        claim.job.claims.append(second)
        peer.active += 1
        self.stats.split += 1
        log.info("splitting %s at byte %d for %s", claim.job.digest, middle, peer.url)
        return peer, second, middle
