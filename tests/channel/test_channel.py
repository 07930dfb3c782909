"""The agent channel's pure pieces: frames a hostile peer cannot turn into a traceback, the metrics outbox
that survives an outage, and the ledger that makes every command run at most once."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dao.aio import full_jitter
from dao.channel.frames import MAX_FRAME, Command, FrameError, Hello, Metrics, Peers, Ping, Result, decode, encode
from dao.channel.ledger import Ledger
from dao.channel.outbox import Outbox


def test_frames_round_trip() -> None:
    for frame in [
        Hello("0.1.0", {"os": "linux", "cpus": 2}, ["c1"]),
        Metrics(7, [{"at": 1.0, "cpu": 12.5}]),
        Command("c2", "container.stop", {"id": "abc"}),
        Result("c2", True, {"stopped": True}),
        Ping(123.5),
        Peers("ab" * 32, ["http://10.0.0.6:5001"]),
    ]:
        assert decode(encode(frame)) == frame


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"t": "shell", "cmd": "rm -rf /"}', "unknown frame type"),
        ('{"t": "command", "op": "container.stop"}', "without id"),
        ('{"t": "command", "id": 5, "op": "x"}', "wrong type"),
        ('{"t": "peers", "secret": "s", "urls": [5]}', "a list of strings"),
        ('{"t": "command", "id": "", "op": "x"}', "1..64"),
        ('{"t": "command", "id": "' + "x" * 65 + '", "op": "x"}', "1..64"),
        ('{"t": "metrics", "seq": true, "samples": []}', "a number"),
        ('{"t": "metrics", "seq": 1, "samples": [1, 2]}', "list of objects"),
        ('{"t": "hello", "version": "1", "done": [1]}', "list of strings"),
        ('{"t": "welcome", "host": "h", "ping_interval": 0}', "ping_interval"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode(text)


def test_oversized_frames_are_refused_before_parsing() -> None:
    with pytest.raises(FrameError, match="over"):
        decode('{"t": "ping", "at": 1, "pad": "' + "x" * MAX_FRAME + '"}')
    with pytest.raises(FrameError, match="over"):
        encode(Metrics(1, [{"blob": "x" * MAX_FRAME}]))


def test_unknown_fields_are_ignored() -> None:
    assert decode('{"t": "ping", "at": 2.5, "from": "a newer console"}') == Ping(2.5)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ),
    st.sampled_from(
        ["hello", "welcome", "metrics", "ack", "state", "event", "command", "result", "stream", "ping", "pong", "other"]
    ),
)
def test_any_json_is_a_frame_or_a_frame_error(value: object, kind: str) -> None:
    doc = value if not isinstance(value, dict) else {**value, "t": kind}
    with contextlib.suppress(FrameError):  # anything else (a TypeError, a KeyError) fails the test
        decode(json.dumps(doc))


def test_the_outbox_keeps_samples_until_acknowledged() -> None:
    box = Outbox(capacity=5)
    for i in range(3):
        box.add({"i": i})
    last, sent = box.batch()
    assert (last, [s["i"] for s in sent]) == (3, [0, 1, 2])
    assert box.batch(after=last) == (3, [])  # nothing newer on this connection
    box.add({"i": 3})
    # the connection broke before the ack: the next one sends everything not acknowledged
    assert [s["i"] for s in box.batch()[1]] == [0, 1, 2, 3]
    box.ack(2)
    assert [s["i"] for s in box.batch()[1]] == [2, 3]
    assert len(box) == 2


def test_a_full_outbox_forgets_the_oldest() -> None:
    box = Outbox(capacity=3)
    for i in range(5):
        box.add({"i": i})
    assert [s["i"] for s in box.batch()[1]] == [2, 3, 4] and box.dropped == 2
    last, first = box.batch(limit=2)
    assert [s["i"] for s in first] == [2, 3] and last == 4


def test_a_command_runs_at_most_once_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    assert ledger.begin("c1")
    assert not ledger.begin("c1")  # re-sent while running
    assert ledger.result("c1") == {"ok": False, "data": "still running"}
    ledger.end("c1", True, {"stopped": True})
    again = Ledger(path)  # the agent restarted
    assert not again.begin("c1") and again.result("c1") == {"ok": True, "data": {"stopped": True}}
    assert again.begin("c2")
    crashed = Ledger(path)  # it died while c2 ran: c2 is not new, and says so
    assert not crashed.begin("c2") and crashed.result("c2") == {"ok": False, "data": "interrupted"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_ledger_is_bounded_and_survives_damage(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.json", capacity=3)
    for i in range(5):
        ledger.begin(f"c{i}")
    assert ledger.ids() == ["c2", "c3", "c4"]
    (tmp_path / "bad.json").write_text("{not json")
    assert Ledger(tmp_path / "bad.json").ids() == []


def test_full_jitter_spreads_over_the_whole_window() -> None:
    waits = [full_jitter(3, 0.5, 30.0) for _ in range(2000)]
    assert 0 <= min(waits) < 0.4 and 3.6 < max(waits) <= 4.0  # 0.5 * 2**3 = 4 s
    assert max(full_jitter(20, 0.5, 30.0) for _ in range(200)) <= 30.0
