"""The agent's host facts and metrics, read from this machine (psutil on the real /proc)."""

from __future__ import annotations

import json
import os

from dao.agent.host import Sampler, facts
from dao.channel.frames import Hello, Metrics, decode, encode


def test_facts_describe_this_host() -> None:
    doc = facts()
    assert doc["cpus"] == os.cpu_count()
    assert doc["kernel"] == os.uname().release and doc["arch"] == os.uname().machine
    assert doc["mem_total"] > 0 and doc["os"]
    assert decode(encode(Hello("0.1.0", doc))) == Hello("0.1.0", doc)  # they travel in a hello frame


def test_samples_are_plain_json_with_sane_values() -> None:
    times = iter([1000.0, 1010.0])
    sampler = Sampler(clock=lambda: next(times))
    with open("/dev/urandom", "rb") as f:
        f.read(1 << 20)  # some work between the two, so the CPU figure has something to measure
    first, second = sampler.sample(), sampler.sample()
    assert (first["at"], second["at"]) == (1000.0, 1010.0)
    for s in (first, second):
        assert 0.0 <= s["cpu"] <= 100.0
        assert 0 < s["mem_used"] <= s["mem_total"]
        assert len(s["load"]) == 3 and all(x >= 0 for x in s["load"])
        assert s["net_rx"] >= 0 and s["net_tx"] >= 0
        assert all(0 <= d["used"] <= d["total"] for d in s["disks"].values())
        assert json.loads(json.dumps(s)) == s
    assert "/" in first["disks"] or first["disks"] == {}  # the root, unless it is an overlay (a container)
    assert decode(encode(Metrics(2, [first, second]))) == Metrics(2, [first, second])
