"""The stream count on hand-made clocks and byte counters: it rises while the rate grows, and steps back."""

from __future__ import annotations

from dao.transfer.adaptive import StreamCount


def drive(count: StreamCount, rate_of: dict[int, float] | None = None, *, per_stream: float, link: float) -> list[int]:
    """Run the controller on a link where each stream gets ``per_stream`` bytes/s and all share ``link``;
    returns the counts it chose, one per change."""
    now, total = 0.0, 0.0
    count.start(now, rtt=0.1)
    chosen = [count.target]
    for _ in range(2000):  # 200 s of 0.1 s ticks: far more than any run needs
        now += 0.1
        total += min(link, per_stream * count.target) * 0.1
        before = count.target
        count.observe(now, int(total))
        if count.target != before:
            chosen.append(count.target)
        if count.held:
            break
    return chosen


def test_a_loss_limited_link_gets_as_many_streams_as_fill_it() -> None:
    # 2.4 mbit per stream, 40 mbit link: ~17 streams fill it.
    count = StreamCount(6, 24)
    chosen = drive(count, per_stream=300_000, link=5_000_000)
    # 12 get 3.6 MB/s, 24 (the cap) fill the link (+39 %): it stays there.
    assert chosen == [6, 12, 24]
    assert count.held and count.target == 24
    assert [n for n, _ in count.steps] == [6, 12, 24]


def test_a_clean_link_stays_where_it_started() -> None:
    # One stream alone could fill it: more streams buy nothing.
    count = StreamCount(6, 24)
    assert drive(count, per_stream=10_000_000, link=5_000_000) == [6, 12, 6]
    assert count.held and count.target == 6


def test_the_cap_is_never_passed() -> None:
    count = StreamCount(6, 10)
    assert drive(count, per_stream=100_000, link=1e12) == [6, 10]
    assert count.target == 10 and count.held


def test_a_cap_at_or_below_the_start_means_a_fixed_count() -> None:
    count = StreamCount(6, 4)
    assert count.target == 4 and count.held
    assert count.observe(100.0, 10**9) == 4


def test_nothing_is_measured_while_new_streams_settle() -> None:
    count = StreamCount(6, 24)
    count.start(0.0, rtt=0.5)  # settle 1.25 s, window 2 s
    assert count.observe(1.0, 10**9) == 6
    assert count.steps == []
    count.observe(1.6, 0)  # settled: the window opens
    count.observe(3.0, 10**6)  # not a whole window yet
    assert count.steps == []
    assert count.observe(3.7, 10**6) == 12
    assert count.steps == [(6, 10**6 / 2.1)]


def test_the_shortest_answer_is_the_round_trip() -> None:
    count = StreamCount(6, 24)
    count.start(0.0, rtt=0.6)  # a first answer that waited for a handshake and a token
    count.round_trip(0.9)
    count.round_trip(0.15)
    assert count.window == 0.6 and count.observe(0.37, 0) == 6 and count.steps == []
    count.observe(0.38, 0)  # settled 2.5 round trips after the start: the window opens
    assert count.observe(0.97, 10**6) == 6
    assert count.observe(0.99, 10**6) == 12
