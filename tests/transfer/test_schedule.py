"""The scheduler's decisions on hand-made jobs, claims and sources: which bytes a free connection takes next,
from where, and which running chunk gives half of itself to an idle connection (the tail split).

End to end, whether a transfer's tail ever has one long chunk depends on timing; here each situation is made
exactly, so each rule can fail on its own.
"""

from __future__ import annotations

from dao.oci.digest import Digest
from dao.registry.runs import Runs
from dao.transfer.job import OPEN_END, Claim, Job
from dao.transfer.schedule import Policy, Scheduler, Stats
from dao.transfer.sources import Peer

MiB = 1024 * 1024
NOW = 1000.0
POLICY = Policy(connections=4, max_connections=4, per_source=4)


def _peer(url: str = "http://m", *, ranges: bool | None = True, rate: float | None = None, mirror: bool = True) -> Peer:
    return Peer(url, lambda blob: None, mirror=mirror, ranges=ranges, rate=rate)  # type: ignore[arg-type,return-value]


def _job(size: int | None, n: int = 0, have: list[tuple[int, int]] | None = None) -> Job:
    return Job(Digest("sha256", f"{n:064x}"), size, -1, order=n, have=Runs(have or []))


def _running(job: Job, peer: Peer, start: int, end: int, done: int, running_for: float) -> Claim:
    """A claim that has run ``running_for`` seconds and written ``done`` bytes."""
    claim = Claim(job, start, end, peer, started=NOW - running_for)
    claim.pos = start + done
    job.claims.append(claim)
    peer.active += 1
    return claim


async def test_chunks_are_taken_from_the_front_of_the_first_job() -> None:
    scheduler, peer = Scheduler(POLICY), _peer()
    first, second = _job(64 * MiB, 0), _job(64 * MiB, 1)
    got = scheduler.next([first, second], [peer], NOW, 4)
    assert got is not None
    to, claim, cursor = got
    assert to is peer and claim.job is first and (claim.start, claim.end, cursor) == (0, POLICY.first_chunk, 0)
    assert peer.active == 1 and first.claims == [claim]
    _, again, _ = scheduler.next([first, second], [peer], NOW, 4) or (None, None, None)
    assert again is not None and (again.start, again.end) == (POLICY.first_chunk, 2 * POLICY.first_chunk)


async def test_a_chunk_is_seconds_of_its_source_and_a_fair_share_at_the_end() -> None:
    scheduler = Scheduler(POLICY)
    measured = _peer(rate=1_000_000)  # 1 MB/s per connection: 4 s of it
    assert scheduler.chunk_size(measured, 100 * MiB, 4) == 4_000_000
    assert scheduler.chunk_size(measured, 8 * MiB, 4) == 2 * MiB  # near the end: a quarter of what is left
    assert scheduler.chunk_size(measured, 100_000, 4) == POLICY.chunk_min  # never below the floor
    assert scheduler.chunk_size(_peer(), 100 * MiB, 4) == POLICY.first_chunk  # not measured yet


async def test_a_blob_of_unknown_size_gets_one_first_request() -> None:
    scheduler, peer = Scheduler(POLICY), _peer(ranges=None)
    job = _job(None)
    got = scheduler.next([job], [peer], NOW, 4)
    assert got is not None and (got[1].start, got[1].end) == (0, POLICY.first_chunk)
    assert scheduler.next([job], [peer], NOW, 4) is None  # nothing more until its answer says the size
    resumed = _job(None, 1, have=[(0, 100), (300, 400)])
    got = scheduler.next([resumed], [peer], NOW, 4)
    assert got is not None and (got[1].start, got[1].end) == (100, 300)  # from what it lacks, not into what it has
    one = Scheduler(Policy(connections=1, max_connections=1))
    got = one.next([_job(None, 2)], [_peer(ranges=None)], NOW, 1)
    assert got is not None and got[1].end == OPEN_END  # one connection: a plain GET of all of it


async def test_a_source_that_ignores_range_gets_the_whole_rest_once() -> None:
    scheduler, peer = Scheduler(POLICY), _peer(ranges=False)
    job = _job(64 * MiB, have=[(0, MiB)])
    got = scheduler.next([job], [peer], NOW, 4)
    assert got is not None and (got[1].start, got[1].end) == (MiB, 64 * MiB)
    assert scheduler.next([job], [peer], NOW, 4) is None  # not a second whole stream of the same blob


async def test_a_waiting_reader_is_served_first() -> None:
    scheduler, peer = Scheduler(POLICY), _peer()
    job = _job(64 * MiB)
    _running(job, peer, 0, 4 * MiB, MiB, 1.0)
    assert job.want(40 * MiB)
    assert not job.want(2 * MiB)  # a running chunk will get there
    assert not job.want(40 * MiB)  # already noted
    got = scheduler.next([job], [peer], NOW, 4)
    assert got is not None and (got[1].start, got[1].end) == (40 * MiB, 40 * MiB + POLICY.first_chunk)
    assert job.wanted == []


async def test_mirrors_before_the_registry_and_the_unmeasured_first() -> None:
    scheduler = Scheduler(POLICY)
    registry = _peer("http://registry", mirror=False, rate=50e6)
    fast, fresh = _peer("http://fast", rate=10e6), _peer("http://fresh")
    got = scheduler.next([_job(64 * MiB)], [registry, fast, fresh], NOW, 4)
    assert got is not None and got[0] is fresh  # each mirror gets its chance to be measured
    got = scheduler.next([_job(64 * MiB, 1)], [registry, fast, fresh], NOW, 4)
    assert got is not None and got[0] is fast  # then the fastest mirror with a free connection
    jobs = [_job(64 * MiB, 2)]
    for _ in range(POLICY.per_source - 1):
        assert scheduler.next(jobs, [registry, fast], NOW, 4) is not None
    assert fast.active == POLICY.per_source  # full: the registry is still the last resort only
    assert scheduler.next(jobs, [registry, fast], NOW, 4) is None or registry.active == 0


async def test_the_chunk_with_most_left_gives_its_second_half() -> None:
    stats = Stats()
    scheduler, peer = Scheduler(POLICY, stats), _peer()
    job = _job(30 * MiB, have=[(0, 2 * MiB), (8 * MiB, 10 * MiB)])  # what the two wrote so far
    # 1 MB/s each: one has 6 MiB left (6 s), the other 20 MiB (20 s); nothing else is unclaimed
    short = _running(job, peer, 0, 8 * MiB, 2 * MiB, 2.0)
    long = _running(job, peer, 8 * MiB, 30 * MiB, 2 * MiB, 2.0)
    got = scheduler.next([job], [peer], NOW, 4)
    assert got is not None
    to, second, cursor = got
    middle = 10 * MiB + (20 * MiB) // 2
    assert to is peer and cursor == second.start == second.pos == middle
    assert (long.end, second.end) == (middle, 30 * MiB)
    assert short.end == 8 * MiB and stats.split == 1 and peer.active == 3
    assert second in job.claims


async def test_no_split_when_it_would_not_pay() -> None:
    cases = {
        "done within the ETA": (4 * MiB, 3 * MiB, 1.0, False),  # 1 MiB left at 3 MiB/s
        "just started": (64 * MiB, 0, 0.1, False),
        "too small to halve": (2 * POLICY.split_min - 1, 0, 5.0, False),
        "already raced": (64 * MiB, MiB, 2.0, True),
    }
    for name, (end, done, running_for, raced) in cases.items():
        peer, job = _peer(), _job(end)
        _running(job, peer, 0, end, done, running_for).raced = raced
        assert Scheduler(POLICY).split([job], [peer], NOW) is None, name


async def test_no_split_onto_a_source_that_ignores_range_nor_when_the_policy_says_no() -> None:
    job = _job(64 * MiB)
    _running(job, _peer(), 0, 64 * MiB, MiB, 2.0)
    assert Scheduler(POLICY).split([job], [_peer(ranges=False)], NOW) is None
    assert Scheduler(Policy(split=False)).split([job], [_peer()], NOW) is None
    assert Scheduler(POLICY).split([job], [_peer()], NOW) is not None


async def test_a_slow_chunk_is_raced_by_a_much_faster_source() -> None:
    stats = Stats()
    scheduler = Scheduler(POLICY, stats)
    slow, fast = _peer("http://slow", rate=100_000), _peer("http://fast", rate=5_000_000)
    job = _job(16 * MiB)
    claim = _running(job, slow, 0, 16 * MiB, 200_000, 2.0)  # 100 kB/s: minutes left
    got = scheduler.reissue([job], [slow, fast], NOW)
    assert got is not None
    to, raced, cursor = got
    assert to is fast and raced is claim and cursor == claim.pos and claim.raced and stats.reissued == 1
    assert scheduler.reissue([job], [slow, fast], NOW) is None  # raced once is enough
