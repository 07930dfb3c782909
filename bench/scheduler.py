#!/usr/bin/env python3
"""How long the scheduler takes to decide, a pure function: 1,000 hosts and 5,000 replicas (1,000 services
of 5, a third of them constrained to half the hosts), from nothing placed, and again with everything
placed and one host lost. Medians of ``--runs``; the target is under 1 s.

    .venv/bin/python bench/scheduler.py [--hosts 1000] [--services 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "src")]

from dao.console.apps.compose import Constraint  # noqa: E402
from dao.console.scheduler.place import Host, Replica, Want, decide  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    gib = 2**30
    hosts = [
        Host(f"h{i:05d}", labels={"region": "eu" if i % 2 else "us"}, cpus=4, mem_total=16 * gib, mem_used=gib)
        for i in range(args.hosts)
    ]
    eu = (Constraint("labels.region", True, "eu"),)
    wants = [
        Want(f"app{i}", "svc", args.replicas, "v1", constraints=eu if i % 3 == 0 else (), cpus=0.1, memory=64 << 20)
        for i in range(args.services)
    ]
    now = time.time()

    def timed(replicas: list[Replica], pool: list[Host]) -> tuple[float, int]:
        times, started = [], 0
        for _ in range(args.runs):
            t = time.perf_counter()
            decision = decide(wants, replicas, pool, now)
            times.append(time.perf_counter() - t)
            started = len(decision.start)
        return statistics.median(times), started

    empty, placed_n = timed([], hosts)
    first = decide(wants, [], hosts, now)
    placed = [Replica(f"c{i}", s.host, s.app, s.service, s.index, s.spec) for i, s in enumerate(first.start)]
    lost = hosts[0]
    pool = [Host(h.id, labels=h.labels, online=False, offline_since=now - 3600) if h is lost else h for h in hosts]
    steady, moved = timed(placed, pool)
    total = args.services * args.replicas
    print(f"{args.hosts} hosts, {args.services} services x {args.replicas} replicas = {total}")
    print(f"{'decision':44}{'time':>10}{'starts':>10}{'target':>10}")
    print(f"{'from nothing placed':44}{empty * 1000:>8.0f} ms{placed_n:>10}{'< 1 s':>10}")
    print(f"{'all placed, one host lost for an hour':44}{steady * 1000:>8.0f} ms{moved:>10}{'< 1 s':>10}")


if __name__ == "__main__":
    main()
